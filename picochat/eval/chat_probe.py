"""`picochat chat-probe`: does a chat checkpoint answer everyday questions in plain English?

    picochat chat-probe --stage sft                 # the chat defaults, seed 0
    picochat chat-probe --stage sft --temperature 0 # the same prompts, greedy

`PROMPTS` (30 fixed everyday questions, none asking for a list, a calculation or a choice)
are answered one by one with the chat sampling defaults (picochat.infer.chat_defaults) and
seeds `seed, seed+1, ...`, so two runs on one checkpoint give the same answers. Metrics,
each a pure function of the answer text:

- echo share: answers that contain a task format nobody asked for (`task_formats`): a
  spelling list (letters between commas, "a,p,p,l,e"), a GSM8K answer line (`#### 42`), a
  calculator call (`<<...>>` or the python tool tokens; allowed for the one arithmetic
  prompt), multiple-choice letters (an answer that is only a letter A-D, or "Answer: B", or
  lines listing "A." ... "B." options);
- repeat share: of all word/punctuation tokens (`probe_tokens`), the share that complete a
  `REPEAT_N`-gram (4 tokens) already seen earlier in the same answer (`repeated_tokens`): 0
  for text that never repeats a 4-token phrase, ~1 for a loop;
- dictionary share: of all words (letters only, case-folded, contractions reduced to their
  stem), the share found in the English word list the spelling tasks use (npm word-list),
  plus "a" and "i";
- mean answer length in model tokens (and words).

Writes $PICOCHAT_HOME/eval/chat_probe_<stage>_<tag>_step<N>.json and .md; the report card
shows the newest of each chat stage. A run with other settings than the defaults (say
`--temperature 0`) names its files `..._step<N>_<settings>.json`, so it never replaces the
defaults' figures in the report.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from picochat.config import add_checkpoint_arguments, add_device_arguments
from picochat.errors import ConfigError
from picochat.fileio import write_json, write_text
from picochat.infer import Engine
from picochat.infer.chat_defaults import CHAT_SAMPLING, add_sampling_arguments, check_sampling_arguments
from picochat.infer.loading import load_for_inference
from picochat.runtime import home, pick_device, pick_dtype
from picochat.tasks.spelling import word_list_path

PROMPTS = (
    "Why is the sky blue?",
    "What is 12 times 7?",
    "Hi! How are you today?",
    "What should I cook for dinner tonight?",
    "Can you tell me a short story about a cat?",
    "How do I make a cup of tea?",
    "What is the capital of France?",
    "Give me some advice for a job interview.",
    "Why do leaves change color in the fall?",
    "What is your name?",
    "How can I sleep better at night?",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "How do airplanes stay in the air?",
    "What are some good habits for students?",
    "Tell me a fun fact about dogs.",
    "How do I stay motivated when I exercise?",
    "What does a doctor do?",
    "Why is it important to drink water?",
    "Can you help me write a thank you note to a friend?",
    "What is the best way to learn a new language?",
    "How does the moon affect the tides?",
    "What is a good name for a pet fish?",
    "Explain what a computer does in simple words.",
    "What should I pack for a weekend trip?",
    "How do bees make honey?",
    "What can I do on a rainy day?",
    "Who wrote Romeo and Juliet?",
    "How do I plant a tree?",
    "What makes a good friend?",
)
REPEAT_N = 4
VERBATIM = 5  # answers shown in full in the markdown and the report

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_WORD = re.compile(r"[a-z]+(?:['\u2019][a-z]+)?")
_CONTRACTION = re.compile(r"(?:n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m))$")
_CONTRACTION_STEMS = {"ca": "can", "wo": "will", "sha": "shall"}  # can't, won't, shan't
_FORMATS = {
    "spelling list": re.compile(r"\b[a-z](?:\s?,\s?[a-z]){3,}\b", re.IGNORECASE),
    "#### answer": re.compile(r"####\s*[-$]?\d"),  # GSM8K's final line; a markdown "#### Heading" is not it
    "calculator call": re.compile(r"<<[^<>]*>>|<\|python_(?:start|end)\|>|<\|output_(?:start|end)\|>"),
    # letters are capitals only: "the answer is a dog" is English, "Answer: B" is a drill
    "multiple choice": re.compile(r"^\(?[A-D]\)?[.)]?$|\b[Aa]nswer(?: is)?\s*:?\s*\(?[A-D]\)?(?:[.)]|\s*$)"
                                  r"|(?:^|\n)\s*A[.)]\s[^\n]*\n\s*B[.)]\s"),
}
# Formats a prompt does ask for: an arithmetic question may use the calculator.
REQUESTED = {"What is 12 times 7?": {"calculator call"}}


# ---------------------------------------------------------------- metrics (pure)


def task_formats(answer: str, prompt: str = "") -> list[str]:
    """Names of the task formats (spelling list, ####, calculator call, multiple choice) in `answer`
    that `prompt` did not ask for."""
    allowed = REQUESTED.get(prompt, set())
    answer = answer.strip()
    return [name for name, pattern in _FORMATS.items() if name not in allowed and pattern.search(answer)]


def probe_tokens(text: str) -> list[str]:
    """Case-folded words, numbers and single punctuation marks: the unit of the repeat measure."""
    return _TOKEN.findall(text.lower())


def repeated_tokens(tokens: list[str], n: int = REPEAT_N) -> int:
    """How many positions i end an n-gram (tokens i-n+1..i) that already ended at an earlier position."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def answer_words(text: str) -> list[str]:
    """Words of letters only, case-folded, with "n't", "'s", "'re", ... reduced to the stem (don't -> do)."""
    words = []
    for word in _WORD.findall(text.lower()):
        stem = _CONTRACTION.sub("", word)
        if stem != word:
            stem = _CONTRACTION_STEMS.get(stem, stem)
        words.append(stem.replace("\u2019", "'"))
    return [w for w in words if w]


def dictionary_words(words: Iterable[str], dictionary: set[str] | frozenset[str]) -> int:
    """How many of `words` are in `dictionary` (single letters count only as "a" and "i")."""
    return sum(1 for w in words if w in dictionary or w in ("a", "i"))


def summarize(answers: list[dict], dictionary: set[str] | frozenset[str]) -> dict:
    """The probe's figures over answers [{"prompt", "answer", "tokens"}]."""
    if not answers:
        raise ConfigError("the chat probe needs at least one answer")
    echo = [a for a in answers if task_formats(a["answer"], a["prompt"])]
    toks = [probe_tokens(a["answer"]) for a in answers]
    words = [answer_words(a["answer"]) for a in answers]
    n_tokens, n_words = sum(map(len, toks)), sum(map(len, words))
    return {
        "answers": len(answers),
        "echo_share": len(echo) / len(answers),
        "echo_formats": sorted({f for a in echo for f in task_formats(a["answer"], a["prompt"])}),
        "repeat_share": sum(map(repeated_tokens, toks)) / n_tokens if n_tokens else 0.0,
        "dictionary_share": sum(dictionary_words(w, dictionary) for w in words) / n_words if n_words else 0.0,
        "mean_tokens": sum(a["tokens"] for a in answers) / len(answers),
        "mean_words": n_words / len(answers),
    }


# ---------------------------------------------------------------- running it


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p, "sft")
    add_sampling_arguments(p, ", the chat default")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed+i (default 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all 30)")
    add_device_arguments(p)


def answer_prompts(engine, prompts: Iterable[str], temperature: float, top_k: int, max_tokens: int,
                   seed: int, repetition_penalty: float | None = None) -> list[dict]:
    """[{"prompt", "answer", "tokens"}]: each prompt answered alone, with seed+i."""
    tokenizer = engine.tokenizer
    answers = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt}]})
        out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                       top_k=top_k or None, seed=seed + i, repetition_penalty=repetition_penalty)
        answers.append({"prompt": prompt, "answer": tokenizer.decode(out[0]).strip(), "tokens": len(out[0])})
    return answers


def render_markdown(result: dict) -> str:
    """The probe as markdown: settings, the four figures, and the first answers verbatim."""
    s, m = result["settings"], result["metrics"]
    lines = [f"### Chat probe: {result['stage']} (step {result['step']})\n",
             (f"{m['answers']} everyday prompts, temperature {s['temperature']}, top-k {s['top_k']}, "
             f"max {s['max_tokens']} tokens, repetition penalty {s.get('repetition_penalty') or 'off'}, "
             f"seed {s['seed']}+i.\n"),
             "| measure | value | target |", "|---|---:|---:|",
             f"| answers echoing a task format | {m['echo_share']:.0%} | <= 10% |",
             f"| tokens in repeats (4-grams seen before in the answer) | {m['repeat_share']:.1%} | <= 5% |",
             f"| dictionary words | {m['dictionary_share']:.1%} | >= 85% |",
             f"| mean answer length | {m['mean_tokens']:.0f} tokens ({m['mean_words']:.0f} words) | |"]
    if m["echo_formats"]:
        lines.append(f"\nFormats echoed: {', '.join(m['echo_formats'])}.")
    lines.append("\nAnswers (verbatim):\n")
    for a in result["answers"][:VERBATIM]:
        lines.append(f"> **{a['prompt']}**  \n> " + a["answer"].replace("\n", "  \n> ")[:600] + "\n")
    return "\n".join(lines)


def probe_file_stem(stage: str, tag: str, step: int, settings: dict, limit: int | None) -> str:
    """chat_probe_<stage>_<tag>_step<N>, plus the settings when they are not the chat defaults."""
    stem = f"chat_probe_{stage}_{tag}_step{step}"
    if settings == {**asdict(CHAT_SAMPLING), "seed": 0} and limit is None:
        return stem
    s = settings
    penalty = f"_rp{s['repetition_penalty']:g}" if s.get("repetition_penalty") else ""
    return (stem + f"_t{s['temperature']:g}_k{s['top_k']}_n{s['max_tokens']}{penalty}_s{s['seed']}"
            + (f"_l{limit}" if limit else ""))


def english_words() -> frozenset[str]:
    """The spelling tasks' English word list (npm word-list, fetched once)."""
    return frozenset(Path(word_list_path()).read_text().split())


def run(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be >= 1")
    device = pick_device(args.device)
    model, tokenizer, meta, path = load_for_inference(args.stage, args.tag, args.step, device)
    engine = Engine(model, tokenizer, compute_dtype=pick_dtype(device, args.dtype))
    answers = answer_prompts(engine, PROMPTS[: args.limit], args.temperature, args.top_k, args.max_tokens,
                             args.seed, args.repetition_penalty)
    stage, tag, step = path.parts[-3], path.parts[-2], int(meta.get("step", path.name.removeprefix("step_")))
    result = {"stage": stage, "tag": tag, "step": step, "checkpoint": str(path),
              "settings": {name: getattr(args, name) for name in (*asdict(CHAT_SAMPLING), "seed")},
              "metrics": summarize(answers, english_words()), "answers": answers}
    out = home() / "eval" / probe_file_stem(stage, tag, step, result["settings"], args.limit)
    markdown = render_markdown(result)
    write_json(out.with_name(out.name + ".json"), result, indent=1)
    write_text(out.with_name(out.name + ".md"), markdown + "\n")
    print(markdown)
    print(f"\nwrote {out}.json and .md")
    return 0
