"""The examples of README.md and docs/*.md run: docs and code cannot drift apart.

The rule (README, "Development"):

- Every fenced ``sh`` block is a shell session; each of its commands (``\\`` continues a
  line) that starts with ``ratta`` is an example. Other commands (``pip``, ``make``,
  ``ray``, ``export``) are not run. A fenced block without a language holds output or a
  diagram, and must not start with a ``ratta`` command.
- The examples of one Markdown file run in order in one empty folder, as a reader
  following the page would: a later example reads what an earlier one wrote. README's
  Python blocks run there too, at their place.
- ``[...]`` parts are optional: the example runs without them, and every flag inside them
  must exist for that subcommand, each ``a|b`` value of a flag with choices among them.
- A block captioned ``*(needs network)*``, ``*(needs a GPU)*`` or ``*(needs a cluster)*``
  (the line right above it) is not run: each of its commands must parse with ratta's own
  parser, or, holding ``...`` (the flags of an earlier example), name only existing flags.
- Inputs the docs name but no example writes come from a generated tiny world
  (:func:`tiny_world`, :data:`INPUTS`): ``/data`` and ``/dbs`` map to its data root and
  database folder, the files (``test.safetensors``, ``dtd_database.npy``, ...) are put in
  the empty folder first; ``--descriptions auto`` reads the published file from the
  world's mirror (``$RATTA_DESCRIPTIONS_URL``). The backbone is always a tiny random-weight
  open_clip model, and :func:`smallest` shrinks sizes (views, decoding workers, datasets).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DTD_CLASSES, make_coop_dtd, reference_pickle, write_clip_corpus, write_images

from ratta.cli import build_parser, main
from ratta.synthetic import make_world

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("sh", "bash", "shell")
NEEDS = re.compile(r"^\*\(needs ([^)]+)\)\*$")
KNOWN_NEEDS = {"network", "a GPU", "a cluster"}
# Commands whose documented outcome is not exit status 0 on the tiny world.
EXIT_STATUS = {("datasets", "check"): 1}  # a generated split never has the published count
# Commands every doc example set must show; `ratta demo` is run by README's `make demo`.
UNDOCUMENTED = {("demo",)}
DIM = 32  # the tiny model's embedding size: every generated embedding has it


# ------------------------------------------------------------------------------ Markdown


@dataclass
class Example:
    """One ``ratta`` command of a shell block."""

    doc: str
    line: int
    text: str  # after "ratta", brackets included
    needs: set[str]

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def required(self) -> str:
        """The text without its optional ``[...]`` parts."""
        return re.sub(r"\[[^\[\]]*\]", " ", self.text)

    @property
    def optional(self) -> list[str]:
        return re.findall(r"\[([^\[\]]*)\]", self.text)


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    body: str
    needs: set[str] = field(default_factory=set)

    def examples(self) -> Iterator[Example]:
        lines = self.body.splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if text.startswith("ratta "):
                yield Example(self.doc, self.line + 1 + start, text[len("ratta ") :], self.needs)


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, re.S | re.M):
        line = text[: m.start()].count("\n") + 1
        above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        needs = NEEDS.match(above)
        block = Block(path.name, line, m.group(1), m.group(2))
        if needs:
            block.needs = {n.strip() for n in needs.group(1).split(",")}
        found.append(block)
    return found


def examples(path: Path) -> list[Example]:
    return [e for b in blocks(path) if b.lang in SHELL for e in b.examples()]


# ------------------------------------------------------------------------------ parser


def subcommand(tokens: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """The (sub)subcommand the tokens name, and its parser."""
    parser, names = build_parser(), []
    for token in tokens:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        parser, names = subs[0].choices[token], [*names, token]
    return tuple(names), parser


def check_flags(example: Example, tokens: list[str], parser: argparse.ArgumentParser) -> None:
    """Every ``--flag`` exists; every ``a|b`` value of a flag with choices is one of them."""
    actions = parser._option_string_actions
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        assert flag in actions, f"{example.where}: ratta {example.text!r}: no flag {flag}"
        choices = actions[flag].choices
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if choices and value and not value.startswith("-") and value != "...":
            for alt in value.split("|"):
                assert alt in choices, f"{example.where}: {flag} {alt} is not one of {choices}"


def parses(example: Example, tokens: list[str]) -> None:
    try:
        build_parser().parse_args(tokens)
    except SystemExit as exc:
        raise AssertionError(f"{example.where}: `ratta {example.text}` does not parse") from exc


# ------------------------------------------------------------------------------ the world


@dataclass
class World:
    root: Path
    data: Path
    dbs: Path
    inputs: Path  # the files placed in each empty folder
    descriptions: Path  # the mirror of --descriptions auto
    model_config: Path
    checkpoint: Path


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, tiny_clip) -> World:
    """DTD in CoOp's layout (3 classes x 2 images), databases, a caption corpus, images and
    webdataset shards, precomputed features/text/database files, the published
    descriptions, all of the tiny model's dimension."""
    root = tmp_path_factory.mktemp("docs-world")
    rng = np.random.default_rng(0)
    data, dbs, inputs, mirror = (root / n for n in ("data", "dbs", "inputs", "mirror"))
    make_coop_dtd(data, per_class=2)
    names = [n.replace("_", " ") for n in DTD_CLASSES]
    mirror.mkdir()
    cupl = {n: [f"A {n} texture, sentence {i}." for i in range(6)] for n in names}
    (mirror / "CuPL_prompts_dtd.json").write_text(json.dumps(cupl))
    dbs.mkdir()
    np.save(dbs / "dtd.npy", _unit(rng.standard_normal((200, DIM))).astype(np.float16))
    make_world(num_classes=6, dim=DIM, num_views=3, num_test=12, db_per_class=8, seed=1).write(
        inputs, dtype=torch.float32
    )
    for name, target in (("features", "test"), ("text", "text"), ("db", "database")):
        ext = ".npy" if name == "db" else ".safetensors"
        (inputs / f"{name}{ext}").rename(inputs / f"{target}{ext}")
    shutil.copy(dbs / "dtd.npy", inputs / "dtd_database.npy")
    (inputs / "classes.txt").write_text("\n".join(names) + "\n")
    (inputs / "synonyms.json").write_text(json.dumps({"banded": ["striped"]}))
    reference_pickle(
        inputs / "LAION2B_dtd_aux_ViT-B_16", _unit(rng.standard_normal((300, DIM))).astype("f2")
    )
    for part in range(2):
        np.save(inputs / f"part-{part}.npy", _unit(rng.standard_normal((50, DIM))).astype("f4"))
    # a caption corpus in which every row names a DTD class: enough rows for IVF1024
    rows = 1100
    captions = [f"a {names[r % 3]} pattern, photo {r}" for r in range(rows)]
    urls = [f"https://example.org/{r}.jpg" for r in range(rows)]
    emb = _unit(rng.standard_normal((rows, DIM)))
    write_clip_corpus(inputs / "laion_embeddings", [(emb, captions, urls)])
    for i, path in enumerate(write_images(inputs / "photos", 3, seed=5)):
        path.with_suffix(".txt").write_text(f"photo {i}")
    for shard in range(10):
        image = write_images(root / "tar-src" / str(shard), 1, seed=shard)[0]
        with tarfile.open(inputs / f"shards-{shard:03d}.tar", "w") as tf:
            tf.add(image, arcname=f"{shard:05d}{image.suffix}")
    return World(root, data, dbs, inputs, mirror, tiny_clip["config"], tiny_clip["checkpoint"])


PLACEHOLDERS = ("/data", "/dbs")
EXTRACTING = {("extract",), ("run",), ("eval",), ("sweep",)}
DECODING = EXTRACTING | {("db", "build")}


def smallest(tokens: list[str], command: tuple[str, ...], parser, world: World) -> list[str]:
    """The tokens of a documented command, run on the tiny world at the smallest size:
    placeholders -> the world's folders; any backbone -> the tiny model; 2 views; images
    decoded in-process; ``--datasets all`` -> the world's one dataset; one seed."""
    out: list[str] = []
    skip = 0
    for i, token in enumerate(tokens):
        if skip:
            skip -= 1
            continue
        for placeholder, real in zip(PLACEHOLDERS, (world.data, world.dbs), strict=True):
            if token == placeholder or token.startswith(placeholder + "/"):
                token = str(real) + token[len(placeholder) :]
        has_config = "--model-config" in parser._option_string_actions
        if has_config and token in ("--model", "--pretrained", "--model-config"):
            skip = 1
            continue
        if token in ("--views", "--workers") and command in (
            EXTRACTING if token == "--views" else DECODING
        ):
            out += [token, "2" if token == "--views" else "0"]
            skip = 1
            continue
        if token == "--datasets" and tokens[i + 1 : i + 2] == ["all"]:
            out += [token, "dtd"]
            skip = 1
            continue
        if token == "--seeds":  # the first seed only
            values = list(itertools.takewhile(lambda t: not t.startswith("-"), tokens[i + 1 :]))
            out += [token, values[0]]
            skip = len(values)
            continue
        out.append(token)
    if "--model-config" in parser._option_string_actions:
        out += ["--model-config", str(world.model_config), "--pretrained", str(world.checkpoint)]
    if command in EXTRACTING and "--views" not in out:
        out += ["--views", "2"]
    if command in DECODING and "--workers" not in out:
        out += ["--workers", "0"]
    return out


def shell_words(text: str, cwd: Path) -> list[str]:
    """The words bash makes of ``text`` (quotes, braces, comments), without running it."""
    proc = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {text}"], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


# ------------------------------------------------------------------------------ tests


def test_every_example_is_in_a_shell_block_and_every_caption_is_known() -> None:
    for path in DOCS:
        for block in blocks(path):
            first = block.body.lstrip().split("\n", 1)[0]
            if block.lang not in SHELL:
                assert not re.match(r"(\$ )?ratta ", first), (
                    f"{path.name}:{block.line}: a ratta command outside a ```sh block"
                )
            assert block.needs <= KNOWN_NEEDS, f"{path.name}:{block.line}: {block.needs}"


def test_every_command_has_an_example() -> None:
    shown = set()
    for path in DOCS:
        for example in examples(path):
            shown.add(subcommand(shlex.split(example.required, comments=True))[0])
    parser = build_parser()
    commands = set()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in top.choices.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        commands |= {(name, n) for n in nested[0].choices} if nested else {(name,)}
    missing = commands - shown - UNDOCUMENTED
    assert not missing, f"commands without a documented example: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_optional_parts_name_existing_flags(doc: Path) -> None:
    for example in examples(doc):
        command, parser = subcommand(shlex.split(example.required, comments=True))
        assert command, f"{example.where}: `ratta {example.text}` names no command"
        for part in example.optional:
            check_flags(example, shlex.split(part), parser)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_examples_run(doc: Path, tiny_world: World, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "reader"
    shutil.copytree(tiny_world.inputs, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("RATTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RATTA_DESCRIPTIONS_URL", tiny_world.descriptions.as_uri())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = 0
    for block in blocks(doc):
        if block.lang == "python" and doc.name == "README.md":
            exec(compile(block.body, f"{doc.name}:{block.line}", "exec"), {})
            ran += 1
            continue
        if block.lang not in SHELL:
            continue
        for example in block.examples():
            words = shell_words(example.required, folder)
            command, parser = subcommand(words)
            if example.needs:
                if "..." in words:
                    check_flags(example, words, parser)
                else:
                    parses(example, words)
                continue
            assert "..." not in words, f"{example.where}: `...` in an example that runs"
            argv = smallest(words, command, parser, tiny_world)
            status = main(argv)
            out = capsys.readouterr()
            assert status == EXIT_STATUS.get(command, 0), (
                f"{example.where}: `ratta {example.required.strip()}` exited {status}\n"
                f"argv: {argv}\nstdout:\n{out.out}\nstderr:\n{out.err}"
            )
            ran += 1
    assert ran or all(e.needs for e in examples(doc)), f"{doc.name}: nothing ran"
