"""The text modality on small, hand-made sources: reading tables and folders, the data
gate's text checks (each failure names the file and row), tokenization shared by
training and serving, the encoder's layer groups and its sources."""

import gzip
import json

import numpy as np
import pytest

from graft import modalities
from graft.base.errors import GraftError
from graft.config.params import IngestParams, LoadPretrainedParams, ValidateParams
from graft.data.snapshot import ingest, read_manifest
from graft.data.validation import validate
from graft.modalities import text

MINILM = LoadPretrainedParams("auto", "packaged:minilm-l6")
VALIDATE = ValidateParams(min_per_class=2, max_imbalance=10.0, min_side=8, max_side=4096, on_class_change="fail")

REVIEWS = [("A warm, funny and clever film.", "fresh"), ("Dull and far too long.", "rotten"),
           ("An instant classic.", "fresh"), ("I want those two hours back.", "rotten"),
           ("Moving, with a great cast.", "fresh"), ("Lifeless and predictable.", "rotten"),
           ("The best comedy of the year.", "fresh"), ("A mess from start to finish.", "rotten")]  # fmt: skip


def snapshot(tmp_path, source: str, path, **kw):
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    manifest, classes, ignored = ingest(IngestParams(source=source, path=str(path), seed=0, **kw), raw)
    return raw, manifest, list(classes), ignored


def failed(result):
    return {c.name: c for c in result.checks if not c.success}


def params_file(tmp_path, max_length=64, on_long_text="warn"):
    path = tmp_path / "params.yaml"
    path.write_text(f"preprocess: {{image_size: 8, val_fraction: 0.2, test_fraction: 0.2, resize: squash, seed: 0, "
                    f"max_length: {max_length}}}\nload_pretrained: {{architecture: auto, source: 'packaged:minilm-l6'}}\n")  # fmt: skip
    return path


def test_csv_table_rows_are_named_by_line_and_bad_rows_fail_by_name(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label,extra"] + [f'"{t}",{c},x' for t, c in REVIEWS]
    rows += ['"Quoted,\nover two lines",fresh,x', '"no label here",,x', '"plot summary",plot,x']
    data = ("\n".join(rows) + "\n").encode() + b'"caf\xe9 au lait",rotten,x\n'  # Latin-1, not UTF-8
    path.write_bytes(data)
    raw, manifest, classes, _ = snapshot(tmp_path, "texttable", path, drop_classes=("plot",))
    assert modalities.of_folder(raw).NAME == "text"
    assert classes == ["fresh", "rotten"]  # the labels found, sorted, "plot" dropped
    assert len(manifest) == 11 and (manifest["split"] == "train").all()
    assert manifest.loc[0, "path"] == "reviews.csv:2"
    assert "reviews.csv:10" in set(manifest["path"]) and "reviews.csv:12" in set(manifest["path"])  # after the 2-line row

    again, _ = read_manifest(raw)
    result = validate(again, classes, VALIDATE, modality=text)
    bad = failed(result)
    assert not result.success
    assert [e["path"] for e in bad["class_name is never empty"].examples] == ["reviews.csv:12"]
    utf8 = bad["every text is UTF-8 text"].examples
    assert [e["path"] for e in utf8] == ["reviews.csv:14"] and "invalid UTF-8: byte 0xe9" in utf8[0]["error"]


def test_table_without_the_named_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("review\tsentiment\ngood\tpos\n")
    with pytest.raises(GraftError, match=r"no column 'text' or 'label' \(the file has: review, sentiment\).*label_column"):
        snapshot(tmp_path, "texttable", path)
    raw, manifest, classes, _ = snapshot(tmp_path, "texttable", path, text_column="review", label_column="sentiment")
    assert classes == ["pos"] and manifest.loc[0, "path"] == "reviews.tsv:2"
    # The hint never suggests the text's own column as the labels.
    only_text = tmp_path / "texts.csv"
    only_text.write_text("text\na fine film\n")
    with pytest.raises(GraftError, match=r"no column 'label'.*needs a column of labels") as e:
        snapshot(tmp_path, "texttable", only_text)
    assert "label_column=text" not in str(e.value)


def test_jsonl_numeric_labels_and_broken_lines(tmp_path):
    path = tmp_path / "reviews.jsonl"
    lines = [json.dumps({"text": t, "label": int(c == "fresh")}) for t, c in REVIEWS] + ["{not json", "", '{"text": null, "label": 1}']
    path.write_text("\n".join(lines) + "\n")
    raw, manifest, classes, _ = snapshot(tmp_path, "texttable", path)
    assert classes == ["0", "1"] and len(manifest) == 10
    result = validate(read_manifest(raw)[0], classes, VALIDATE, modality=text)
    bad = failed(result)
    assert [e["path"] for e in bad["every text is UTF-8 text"].examples] == ["reviews.jsonl:9"]
    assert "not valid JSON" in bad["every text is UTF-8 text"].examples[0]["error"]
    assert [e["path"] for e in bad["no empty or whitespace-only text"].examples] == ["reviews.jsonl:11"]


def test_folder_with_splits_binary_files_empty_texts_and_leaks(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "test"):
        for i, (t, c) in enumerate(REVIEWS):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            (root / split / c / f"{i}.txt").write_text(f"{split} {i}: {t}")
    (root / "train" / "fresh" / "leak.txt").write_text("Exactly  the same review.")
    (root / "test" / "fresh" / "leak.txt").write_text("exactly the same REVIEW. ")  # equal up to case and spaces
    (root / "train" / "rotten" / "copy.txt").write_text("verbatim copy")
    (root / "test" / "rotten" / "copy.txt").write_text("verbatim copy")
    (root / "train" / "rotten" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "train" / "fresh" / "blank.txt").write_text("  \n\t ")
    (root / "train" / "fresh" / "notes.md").write_text("not a sample")
    raw, manifest, classes, ignored = snapshot(tmp_path, "textfolder", root)
    assert ignored == ["train/fresh/notes.md"] and set(manifest["split"]) == {"train", "test"}
    bad = failed(validate(read_manifest(raw)[0], classes, VALIDATE, modality=text))
    assert [e["path"] for e in bad["every text is UTF-8 text"].examples] == ["train/rotten/image.txt"]
    assert [e["path"] for e in bad["no empty or whitespace-only text"].examples] == ["train/fresh/blank.txt"]
    assert {e["path"] for e in bad["no text in both train and test"].examples} == {"train/rotten/copy.txt", "test/rotten/copy.txt"}
    normalised = {e["path"] for e in bad["no text in both train and test after folding case and whitespace"].examples}
    assert normalised == {"train/fresh/leak.txt", "test/fresh/leak.txt", "train/rotten/copy.txt", "test/rotten/copy.txt"}


def test_long_texts_warn_or_fail_by_parameter_counting_real_tokens(tmp_path):
    path = tmp_path / "reviews.csv"
    long = "An astonishing film. " * 12  # about 50 tokens
    path.write_text("text,label\n" + "".join(f'"{t}",{c}\n' for t, c in REVIEWS) + f'"{long}",fresh\n')
    raw, manifest, classes, _ = snapshot(tmp_path, "texttable", path)
    context = {"raw": raw, "params": params_file(tmp_path, max_length=16)}
    warned = validate(read_manifest(raw)[0], classes, VALIDATE, modality=text, context=context)
    check = next(c for c in warned.checks if c.name.startswith("every text within 16 tokens"))
    assert warned.success and check.severity == "warning" and not check.success
    assert [e["path"] for e in check.examples] == ["reviews.csv:10"] and check.examples[0]["tokens"] > 16
    strict = ValidateParams(**{**VALIDATE.__dict__, "on_long_text": "fail"})
    assert not validate(read_manifest(raw)[0], classes, strict, modality=text, context=context).success


def test_encoder_tokenizes_bytes_and_strings_alike_truncates_and_pads(tmp_path):
    from graft.config.params import PreprocessParams

    pre = PreprocessParams(image_size=8, val_fraction=0.2, test_fraction=0.2, resize="squash", seed=0, max_length=8)
    spec = text.input_spec(pre, MINILM, tmp_path / "assets")
    enc = text.Encoder(spec, tmp_path / "assets")
    short, long = "Great fun!", "one two three four five six seven eight nine ten"
    a = enc.encode(short.encode())
    assert a.dtype == np.int32 and a.shape == (8,) and (a[a >= 0] > 0).all() and (a[(a >= 0).sum():] == -1).all()
    batch = enc.batch([short, long.encode()])
    assert (batch[0] == a).all() and (batch[1] >= 0).all()  # the long one fills max_length
    assert enc.tokenizer.decode(batch[1].tolist(), skip_special_tokens=True).startswith("one two three")


def test_text_model_layer_groups_and_partial_freezing():
    from graft.training.fine_tune import layer_groups, set_trainable, trainable_groups

    built = text.build(MINILM, 3, {"max_length": 16}, _tmp_assets())
    model = built.model
    assert built.architecture == "bert" and built.weights_sha256
    groups = layer_groups(model)
    assert len(groups) == 8  # embeddings, 6 transformer layers, head
    assert all(n.startswith("encoder.embeddings.") for n, _ in groups[0])
    assert all(n.startswith("encoder.encoder.layer.5.") for n, _ in groups[6]) and groups[7][0][0].startswith("head.")
    active = trainable_groups(len(groups), "partial", 3)  # embeddings and the first two layers frozen
    set_trainable(groups, active)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("encoder.encoder.layer.1.") for n in frozen)
    assert not any(n.startswith("encoder.encoder.layer.2.") for n in frozen)
    ids = np.array([[101, 2307, 102, -1], [101, 102, -1, -1]], dtype=np.int32)
    import torch

    model.eval()
    with torch.no_grad():
        x = text.to_input(ids, None, "cpu")
        assert x.shape == (2, 3)  # cut to the batch's longest text
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        alone = model.forward_head(model.forward_features(x[1:, :2]), pre_logits=True)
    assert torch.allclose(pooled[1], alone[0], atol=1e-5)  # padding does not change a text's embedding


def _tmp_assets():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="graft-assets-"))


def test_sources_file_scratch_and_offline_hub(tmp_path, monkeypatch):
    import shutil

    packaged = text._packaged_dir("minilm-l6")
    copy = tmp_path / "encoder"
    shutil.copytree(packaged, copy)
    a = text.build(LoadPretrainedParams("auto", "packaged:minilm-l6"), 2, {"max_length": 16}, _tmp_assets())
    b = text.build(LoadPretrainedParams("bert", f"file:{copy}"), 2, {"max_length": 16}, _tmp_assets())
    assert a.weights_sha256 == b.weights_sha256
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all((sa[k] == sb[k]).all() for k in sa)  # same weights, same seeded head
    scratch = text.build(LoadPretrainedParams("auto", "scratch:minilm-l6"), 2, {"max_length": 16}, _tmp_assets())
    assert scratch.weights_sha256 is None
    key = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not (scratch.model.state_dict()[key] == sa[key]).all()
    with pytest.raises(GraftError, match="differs from the encoder's own"):
        text.build(LoadPretrainedParams("roberta", "packaged:minilm-l6"), 2, {"max_length": 16}, _tmp_assets())
    with pytest.raises(GraftError, match="no config.json"):
        text.build(LoadPretrainedParams("auto", f"file:{tmp_path}"), 2, {"max_length": 16}, _tmp_assets())
    with pytest.raises(GraftError, match="more than packaged:minilm-l6 takes"):
        text.build(LoadPretrainedParams("auto", "packaged:minilm-l6"), 2, {"max_length": 4096}, _tmp_assets())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline in milliseconds
    with pytest.raises(GraftError, match=r"unreachable.*file:encoder"):
        text.build(LoadPretrainedParams("auto", "hf:sentence-transformers/all-MiniLM-L6-v2"), 2, {"max_length": 16},
                   _tmp_assets())  # fmt: skip


def test_predict_inputs_lines_tables_and_folders(tmp_path):
    lines = tmp_path / "in.txt"
    lines.write_bytes(b"first text\n\nsecond\n\xff broken\n")
    got = [(n, *load()) for n, load in text.read_inputs(lines)]
    assert [g[0] for g in got] == [f"{lines}:1", f"{lines}:3", f"{lines}:4"]
    assert got[0][1:] == ("first text", "") and got[2][2].startswith("invalid UTF-8")
    table = tmp_path / "in.csv"
    table.write_text("id,review\n1,nice\n")
    with pytest.raises(GraftError, match="no column 'text'.*--text-column"):
        text.read_inputs(table)
    assert [load() for _, load in text.read_inputs(table, "review")] == [("nice", "")]
    assert text.input_columns(table, "review") == {f"{table}:2": {"id": "1"}}
    assert text.input_columns(lines) == {}
    folder = tmp_path / "docs"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.txt").write_text("one whole file")
    (folder / "a" / "y.bin").write_bytes(b"\x00")
    assert [(n, load()) for n, load in text.read_inputs(folder)] == [(str(folder / "a" / "x.txt"), ("one whole file", ""))]


def test_a_table_is_streamed_and_each_text_read_again_when_written(tmp_path):
    """Ingest keeps no text from its first pass over a table (labels only): each chosen
    row is read again from the file, in file order, when the snapshot is written."""
    path = tmp_path / "reviews.csv.gz"
    rows = ["\ufefftext,label"] + [f'"{t}",{c}' for t, c in REVIEWS] + ['"Two\nlines",fresh']
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode() + b'"caf\xe9",rotten\n'))
    source = text.read_table(path, "text", "label")
    assert [c.path for c in source.candidates][-3:] == ["reviews.csv.gz:9", "reviews.csv.gz:10", "reviews.csv.gz:12"]
    got = [c.read() for c in source.candidates]
    assert got[:8] == [t.encode() for t, _ in REVIEWS] and got[8] == b"Two\nlines" and got[9] == b"caf\xe9"
    assert source.candidates[1].read() == REVIEWS[1][0].encode()  # an earlier row: the pass starts again
    path.write_bytes(gzip.compress(b"text,label\n"))  # the file changes under it: named, not served stale
    with pytest.raises(GraftError, match="reviews.csv.gz: line 2 is gone"):
        source.candidates[0].read()


def test_predict_reads_text_files_line_by_line(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes(b"first text\r\n\r\nsecond\rthird \xff\n")
    inputs = text.read_inputs(path)
    assert [n for n, _ in inputs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert [load() for _, load in inputs][:2] == [("first text", ""), ("second", "")]
    assert inputs[2][1]()[1].startswith("invalid UTF-8")


def test_predict_keeps_a_tables_other_columns(tmp_path):
    """`graft predict` on a CSV: each output row carries its input row's id, so the
    predictions can be matched back (a row that cannot be read too)."""
    import csv

    import pandas as pd

    from graft.models.predict import predict_to_csv

    class Lengths:  # the pyfunc's contract: a DataFrame of inputs in, class and probability out
        def predict(self, df):
            return pd.DataFrame({"class": ["long" if len(t) > 4 else "short" for t in df["text"]], "probability": 0.9})

    table = tmp_path / "in.csv"
    table.write_bytes(b"id,review,source\n7,nice,web\n8,a long review,app\n9,\xff,web\n")
    out = tmp_path / "out.csv"
    result = predict_to_csv(Lengths(), text, text.read_inputs(table, "review"), out,
                            columns=text.input_columns(table, "review"))  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["7", "8", "9"] and [r["source"] for r in rows] == ["web", "app", "web"]
    assert [r["class"] for r in rows] == ["short", "long", ""] and rows[2]["error"].startswith("invalid UTF-8")
    assert result.total == 3 and result.bad == 1
