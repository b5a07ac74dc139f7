"""Tasks posed to ARMs and MDMs: generators of clean/corrupted example pairs checked against a tokenizer."""
