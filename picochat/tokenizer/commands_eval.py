"""`picochat tok-eval`: how well the tokenizer compresses text, next to GPT-2's and GPT-4's.

Compression = UTF-8 bytes / tokens (higher is better: more text per token, so
longer effective context and cheaper training per byte). Measured on short
samples of news, code, math, science, Korean and German, and on the first row
group of the first train shard and of the val shard. The relative difference
vs a reference is (their tokens - our tokens) / their tokens: positive means
ours needs fewer tokens.

    picochat tok-eval                       # writes $PICOCHAT_HOME/tokenizer/tok_eval.{json,md}
    picochat tok-eval --references none     # ours only (no registry fetches)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from picochat.data.shards import default_data_dir, iter_texts, list_shards
from picochat.errors import DataError, UserError
from picochat.fileio import write_json, write_text
from picochat.runtime import home, warn
from picochat.tokenizer.bpe import Tokenizer
from picochat.tokenizer.reference import REFERENCES, load_references

LABELS = {"ours": "ours", "gpt2": "GPT-2", "gpt4": "GPT-4"}

SAMPLES = {
    "news": (
        "HARBOR CITY — The council voted 7 to 2 on Tuesday night to rebuild the old ferry pier, "
        "ending a dispute that had stalled the project since the storm of 2019. The plan, estimated at "
        "$48.5 million, adds a covered waiting hall, two charging berths for electric ferries and a "
        "public boardwalk. \"We have waited long enough,\" said Mayor Ines Okafor after the vote. "
        "Opponents argued that the money should first go to flood barriers along the east shore. "
        "Construction is expected to begin next spring and to take about 30 months."
    ),
    "code": (
        "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    out, total = [], 0.0\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        if i >= window - 1:\n"
        "            out.append(total / window)\n"
        "    return out\n\n\n"
        "class Counter:\n"
        "    def __init__(self):\n"
        "        self.counts = {}\n\n"
        "    def add(self, key):\n"
        "        self.counts[key] = self.counts.get(key, 0) + 1\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Completing the square gives f(x) = 3(x - 2)^2 - 5, so the minimum "
        "value is -5 at x = 2. The roots solve 3x^2 - 12x + 7 = 0: x = (12 ± √(144 - 84)) / 6 = "
        "2 ± √60/6 ≈ 2 ± 1.291, i.e. x₁ ≈ 0.709 and x₂ ≈ 3.291. For the integral, "
        "∫₀² f(x) dx = [x^3 - 6x^2 + 7x]₀² = 8 - 24 + 14 = -2. Check: f(0) = 7 > 0 and f(2) = -5 < 0, "
        "so by the intermediate value theorem a root lies in (0, 2), as found."
    ),
    "science": (
        "Photosynthesis turns light energy into chemical energy in two linked stages. In the "
        "light-dependent reactions, photosystem II splits water (2 H2O → 4 H+ + 4 e− + O2) and the "
        "electrons pass along the thylakoid membrane, pumping protons that drive ATP synthase. "
        "In the Calvin cycle, the enzyme RuBisCO fixes CO2 onto ribulose-1,5-bisphosphate; each turn "
        "needs 3 ATP and 2 NADPH per carbon. Because RuBisCO also reacts with O2, C4 plants such as "
        "maize concentrate CO2 around it, raising efficiency in hot, dry conditions."
    ),
    "korean": (
        "어제 저녁 우리 동네 도서관에서 작은 음악회가 열렸다. 학생들이 바이올린과 피아노로 "
        "가을 노래를 연주했고, 할머니들은 박수를 치며 따라 불렀다. 관장님은 다음 달에는 시 낭독회를 "
        "준비하겠다고 말했다. 입장료는 없었지만 많은 사람들이 책을 기증하고 돌아갔다."
    ),
    "german": (
        "Am Samstag öffnet der Wochenmarkt ausnahmsweise erst um zehn Uhr, weil die Straße wegen "
        "Bauarbeiten gesperrt ist. Die Händler bieten Äpfel, Kürbisse und frisch gebackenes Brot an. "
        "Wer mit dem Fahrrad kommt, findet neue Stellplätze hinter dem Rathaus. Die Stadtverwaltung "
        "bittet um Verständnis für die Verzögerung und verspricht, dass die Arbeiten bis Ende "
        "Oktober abgeschlossen sind."
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="tokenizer to evaluate; the results are written there too (default $PICOCHAT_HOME/tokenizer)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="shard directory for the train/val rows (default $PICOCHAT_HOME/data/builtin)")
    parser.add_argument("--references", default="gpt2,gpt4",
                        help=f"comma-separated reference tokenizers from {', '.join(REFERENCES)}, or 'none'")


def shard_samples(data_dir: Path) -> dict[str, list[str]]:
    """The first row group of the first train shard and of the val shard (null rows skipped, as in training)."""
    train_files, val_file = list_shards(data_dir)
    first = {"train": train_files[0], "val": val_file}
    return {name: [d for d in next(iter_texts(path))[1] if d is not None] for name, path in first.items()}


def compression_table(tok: Tokenizer, references: dict, texts: dict[str, list[str]]) -> list[dict]:
    """One row per text: bytes, and per tokenizer its tokens, bytes/token and relative difference."""
    rows = []
    for name, docs in texts.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        if n_bytes == 0:
            continue
        ours = sum(map(len, tok.encode(docs)))
        row = {"text": name, "bytes": n_bytes, "ours": {"tokens": ours, "bytes_per_token": n_bytes / ours}}
        for ref_name, enc in references.items():
            theirs = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=1)))
            row[ref_name] = {"tokens": theirs, "bytes_per_token": n_bytes / theirs,
                             "relative_diff_pct": 100.0 * (theirs - ours) / theirs}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], reference_names: list[str]) -> str:
    head = ["text", "bytes", "ours tok", "ours B/tok"]
    for r in reference_names:
        head += [f"{LABELS[r]} tok", f"{LABELS[r]} B/tok", f"vs {LABELS[r]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["text"], f"{row['bytes']:,}", f"{row['ours']['tokens']:,}", f"{row['ours']['bytes_per_token']:.2f}"]
        for ref in (row[r] for r in reference_names):
            cells += [f"{ref['tokens']:,}", f"{ref['bytes_per_token']:.2f}", f"{ref['relative_diff_pct']:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    tok_dir = args.tokenizer_dir or home() / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    if tok_dir.is_file():  # tokenizer.json itself: the results go beside it
        tok_dir = tok_dir.parent
    names = [] if args.references.strip() == "none" else [n.strip() for n in args.references.split(",") if n.strip()]
    if unknown := [n for n in names if n not in REFERENCES]:
        raise UserError(f"--references: unknown {unknown}; choose from {', '.join(REFERENCES)} or 'none'")

    references, notices = load_references(names)
    texts = {name: [text] for name, text in SAMPLES.items()}
    try:
        texts.update(shard_samples(args.data_dir or default_data_dir()))
    except DataError as e:
        notices.append(f"train/val rows skipped: {e}")
    for notice in notices:
        warn(notice)

    rows = compression_table(tok, references, texts)
    table = markdown_table(rows, list(references))
    legend = ("B/tok = UTF-8 bytes per token (higher is better); vs X = (X tokens - our tokens) / X tokens "
              "(positive: ours needs fewer tokens)")
    print(f"tokenizer {tok_dir} (vocab {tok.vocab_size:,}, hash {tok.hash})\n")
    print(f"{table}\n\n{legend}")

    result = {"tokenizer": {"dir": str(tok_dir), "hash": tok.hash, "vocab_size": tok.vocab_size},
              "references": {name: {"vocab_size": enc.n_vocab} for name, enc in references.items()},
              "notices": notices, "rows": rows}
    write_json(tok_dir / "tok_eval.json", result, indent=2)
    notes = "".join(f"\n- {n}" for n in notices)
    write_text(tok_dir / "tok_eval.md", f"# Tokenizer evaluation\n\nvocab {tok.vocab_size:,}, hash `{tok.hash}`\n\n"
               f"{table}\n\n{legend}\n" + (f"\nNotices:{notes}\n" if notices else ""))
    print(f"\nwritten {tok_dir}/tok_eval.json and tok_eval.md")
    return 0
