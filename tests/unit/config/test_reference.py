"""The README's recipe reference is the schema's: regenerate it with `python -m kd.config.reference` when a key changes."""
from pathlib import Path

from kd.config.reference import BEGIN, END, markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_reference_matches_schema():
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lacks the generated recipe reference"
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == markdown(), "README recipe reference is stale: run `python -m kd.config.reference` and paste it"
