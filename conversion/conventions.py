"""How a checkpoint is read: as an ARM, or as an MDM (bidirectional attention, a mask token, and logits
shifted or not). One resolver for every source format, so the same flags mean the same thing."""

from __future__ import annotations

from typing import Any

# DiffuLLaMA re-uses an existing Llama-2 vocabulary token as its mask (not stated in its config). It is taken
# by default only where the checkpoint's tokenizer has LLaMA-2's 32,000 tokens: in another vocabulary 811 is
# some other word.
DIFFULLAMA_MASK_TOKEN_ID = 811
LLAMA2_VOCABULARY_SIZE = 32_000

_KNOWN_MASKS = "Dream-v0 uses 151666, LLaDA-8B 126336, DiffuLLaMA 811"


def resolve_conventions(
    *,
    family: str,
    native: str,
    mdm: bool | None,
    mask_token_id: int | None,
    config_mask_token_id: int | None,
    problems: list[str],
    tokenizer_vocabulary: int | None = None,
) -> dict[str, Any]:
    """The `attention`, `logit_shift` and `mask_token_id` fields of a ModelConfig.

    Args:
      family: "llama", "qwen2", "dream" or "llada" (used for the family's default mask token).
      native: what the family is on its own: "arm", "shifted_mdm" (Dream) or "unshifted_mdm" (LLaDA).
      mdm: the user's statement: None keeps `native`; True reads an ARM-format checkpoint as an MDM
        post-trained from an ARM (DiffuLLaMA: bidirectional, shifted); False insists on an ARM.
      mask_token_id: the user's mask token, overriding the config's.
      config_mask_token_id: the mask token stated by the checkpoint, if any.
      problems: where contradictions are reported.
      tokenizer_vocabulary: the size of the checkpoint's own tokenizer, if it has one (it decides whether
        DiffuLLaMA's mask token may be assumed).
    """
    if native != "arm" and mdm is False:
        problems.append(f"{family} is a masked diffusion model; do not pass mdm=False")
    is_mdm = native != "arm" or bool(mdm)
    if not is_mdm:
        if mask_token_id is not None:
            problems.append("a mask token was given for an autoregressive model; pass mdm=True (--mdm) to read "
                            "the checkpoint as a masked diffusion model")
        return dict(attention="causal", logit_shift=True, mask_token_id=None)
    mask = mask_token_id if mask_token_id is not None else config_mask_token_id
    if mask is None and family == "llama":
        if tokenizer_vocabulary != LLAMA2_VOCABULARY_SIZE:
            problems.append(
                f"DiffuLLaMA's mask token {DIFFULLAMA_MASK_TOKEN_ID} is LLaMA-2's, but this checkpoint's tokenizer "
                + ("is missing" if tokenizer_vocabulary is None else f"has {tokenizer_vocabulary} tokens, not "
                   f"{LLAMA2_VOCABULARY_SIZE}") + "; pass the mask token (--mask-token-id N)")
            return dict(attention="bidirectional", logit_shift=True, mask_token_id=None)
        mask = DIFFULLAMA_MASK_TOKEN_ID
    if mask is None:
        problems.append(f"a masked diffusion model needs a mask token and the checkpoint states none; pass "
                        f"mask_token_id (--mask-token-id N); {_KNOWN_MASKS}")
    return dict(attention="bidirectional", logit_shift=native != "unshifted_mdm", mask_token_id=mask)
