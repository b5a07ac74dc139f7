"""The comparison's report: a document of headings, paragraphs, tables and figures written as Markdown and as
self-contained HTML (`document`), and its figures (`figures`)."""
