"""Source files that `picochat export --format hf` copies into a transformers remote-code export.

They import only torch and transformers (never picochat): they run wherever the export is loaded."""
