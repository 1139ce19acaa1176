"""The toy teacher's tiny vocabulary and prompt templates ("a handwritten digit seven", "7", ...)."""

from __future__ import annotations

from pathlib import Path

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {word}: the digit spelled out, {digit}: the numeral. Template 0 is the default prompt.
TEMPLATES = (
    "a handwritten digit {word}",
    "digit {digit}",
    "{digit}",
    "{word}",
    "a handwritten {digit}",
    "the number {word}",
    "a handwritten digit {digit}",
    "the number {digit}",
)

# longest prompt is 4 words -> 6 tokens with start/end; 16 leaves room
MAX_TOKENS = 16


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt asking for ``digit`` (0-9) with template number ``template``."""
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0-9, got {digit}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be 0-{len(TEMPLATES) - 1}, got {template}")
    return TEMPLATES[template].format(word=DIGIT_WORDS[digit], digit=digit)


def prompts_for_class(digit: int) -> list[str]:
    """Every training prompt for ``digit``, one per template."""
    return [prompt_for(digit, t) for t in range(len(TEMPLATES))]


def training_prompts() -> dict[int, list[str]]:
    """{digit: its training prompts} for all ten digits."""
    return {d: prompts_for_class(d) for d in range(10)}


def all_words() -> list[str]:
    """Every word of every prompt, in first-seen order (each becomes one token)."""
    words: dict[str, None] = {}
    for prompts in training_prompts().values():
        for prompt in prompts:
            words.update(dict.fromkeys(prompt.split()))
    return list(words)


def build_tokenizer(directory: str | Path):
    """Write and load the toy CLIPTokenizer (chars + every vocabulary word) in ``directory``."""
    from wadi.testing import build_clip_tokenizer

    return build_clip_tokenizer(directory, all_words(), max_length=MAX_TOKENS)
