"""Captioned shards (KEY.jpg + KEY.txt) from real CIFAR JPEGs: made from a folder with x.txt beside
x.jpg, from a Parquet / JSONL / CSV caption file, and indexed from webdataset's ShardWriter.

Every dataset is read back by the real stream (`data.make_loader`) and by plain `tarfile`: each
image exactly once, with its caption byte for byte. Bad captions are refused by the CLI with exit
2 and one message naming the row or file, before anything is written.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from ssl_dist import cli, data, decode, shards, storage
from ssl_dist.shards.captions import caption_problem


def caption_for(path: str) -> bytes:
    """A caption with non-ASCII text and a trailing newline, both kept as they are."""
    name = Path(path).stem
    return f"a photo of {Path(path).parent.name or 'it'} n°{name} — “quoted”, ☃\n".encode()


def keys_and_text(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "txt": sample["txt"]}


def stream_captions(url: str, total: int) -> dict[str, bytes]:
    """key -> caption bytes of one epoch of the real data stream (batches of 10: nothing dropped)."""
    assert total % 10 == 0
    loader = data.make_loader(url, rank=0, world_size=1, batch_size=10, shuffle_window=64, transform=keys_and_text)
    seen: dict[str, bytes] = {}
    for batch in loader:
        assert batch["__valid__"].all()
        for key, text in zip(batch["__key__"], batch["txt"]):
            assert key not in seen
            seen[key] = text.encode("utf-8")
    return seen


def tar_samples(folder: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample, read with plain tarfile (GNU tar's view of the shards)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["url"]) as tar:
            for member in tar:
                assert not member.pax_headers
                key, _, ext = member.name.rpartition(".")
                fields = samples.setdefault(key, {})
                assert ext not in fields
                fields[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def captioned(source, tmp_path_factory) -> Path:
    """The CIFAR ImageFolder slice with x.txt beside every x.jpg."""
    root = tmp_path_factory.mktemp("captioned") / "src"
    shutil.copytree(source, root)
    for image in root.rglob("*.jpg"):
        image.with_suffix(".txt").write_bytes(caption_for(str(image.relative_to(root))))
    return root


@pytest.fixture(scope="module")
def flat(source, tmp_path_factory) -> tuple[Path, dict[str, tuple[bytes, bytes]]]:
    """The slice flattened (SRC/<class>_<n>.jpg + .txt, no class folders); key -> (image, caption)."""
    root = tmp_path_factory.mktemp("flat") / "src"
    root.mkdir()
    expected = {}
    for image in sorted(source.rglob("*.jpg")):
        key = f"{image.parent.name}_{image.stem}"
        (root / f"{key}.jpg").write_bytes(image.read_bytes())
        (root / f"{key}.txt").write_bytes(caption_for(f"{image.parent.name}/{image.stem}.jpg"))
        expected[key] = (image.read_bytes(), caption_for(f"{image.parent.name}/{image.stem}.jpg"))
    return root, expected


def test_captions_beside_images_in_imagefolder_layout(captioned, expected, tmp_path):
    dest = tmp_path / "shards"
    manifest = shards.make_shards(str(captioned), str(dest), samples_per_shard=64, workers=2)
    assert manifest["fields"] == ["cls", "jpg", "txt"]
    assert manifest["classes"] == sorted({key.split("/")[0] for key in expected})
    assert shards.read_manifest(str(dest)) == manifest

    samples = tar_samples(dest, manifest)
    assert sorted(samples) == sorted(expected)  # every image exactly once
    for key, fields in samples.items():
        image, label = expected[key]
        assert fields == {"cls": str(label).encode(), "jpg": image, "txt": caption_for(key + ".jpg")}
    streamed = stream_captions(str(dest), manifest["num_samples"])
    assert streamed == {key: caption_for(key + ".jpg") for key in expected}
    assert shards.check_shards(str(dest))["problems"] == []

    again = shards.make_shards(str(captioned), str(tmp_path / "again"), samples_per_shard=64, workers=3)
    assert again["shards"] == manifest["shards"]
    for shard in manifest["shards"]:  # deterministic, byte for byte
        assert (tmp_path / "again" / shard["url"]).read_bytes() == (dest / shard["url"]).read_bytes()


def test_captions_beside_images_in_a_flat_folder_and_its_tar(flat, tmp_path):
    root, expected = flat
    manifest = shards.make_shards(str(root), str(tmp_path / "shards"), samples_per_shard=50, workers=2)
    assert manifest["fields"] == ["jpg", "txt"]
    assert "classes" not in manifest  # no class folders: no .cls
    samples = tar_samples(tmp_path / "shards", manifest)
    assert samples == {key: {"jpg": image, "txt": caption} for key, (image, caption) in expected.items()}
    assert stream_captions(str(tmp_path / "shards"), 200) == {key: c for key, (_, c) in expected.items()}

    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    from_tar = shards.make_shards(str(archive), str(tmp_path / "from_tar"), samples_per_shard=50, workers=2)
    assert from_tar["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert (tmp_path / "from_tar" / shard["url"]).read_bytes() == (tmp_path / "shards" / shard["url"]).read_bytes()


def write_table(path: Path, rows: list[dict]) -> None:
    """Rows as Parquet, JSONL or CSV, by `path`'s extension."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_caption_file_parquet_to_s3(source, expected, bucket, tmp_path):
    rows = [{"image": f"{key}.jpg", "caption": caption_for(key + ".jpg").decode(), "other": 1} for key in expected]
    table = tmp_path / "captions.parquet"
    write_table(table, rows)
    url = f"s3://{bucket}/captioned"
    manifest = shards.make_shards(str(source), url, captions=str(table), samples_per_shard=64, workers=2,
                                  storage_options=storage.storage_options(url))
    assert manifest["fields"] == ["jpg", "txt"] and "classes" not in manifest
    assert shards.read_manifest(url, storage.storage_options(url)) == manifest
    assert stream_captions(url, 200) == {key: caption_for(key + ".jpg") for key in expected}
    local = tmp_path / "copy"
    fs, root = storage.filesystem(url, storage.storage_options(url))
    fs.get(f"{root}/", str(local), recursive=True)
    samples = tar_samples(local, manifest)
    assert samples == {key: {"jpg": image, "txt": caption_for(key + ".jpg")} for key, (image, _) in expected.items()}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_caption_file_jsonl_and_csv_through_the_cli(source, expected, tmp_path, suffix, capsys):
    keys = sorted(expected)[:100]  # a caption file may name a subset of SRC
    table = tmp_path / f"captions{suffix}"
    write_table(table, [{"path": f"./{key}.jpg", "text": caption_for(key + ".jpg").decode()} for key in keys])
    dest = tmp_path / "shards"
    assert cli.main(["shards", "make", str(source), str(dest), "--captions", str(table), "--image-column", "path",
                     "--caption-column", "text", "--samples-per-shard", "30"]) == 0
    out = capsys.readouterr().out
    assert "100 samples" in out
    assert "100 images the caption file does not name" in out, out  # said, not silently left out
    manifest = shards.read_manifest(str(dest))
    assert manifest["fields"] == ["jpg", "txt"]
    assert [s["num_samples"] for s in manifest["shards"]] == [30, 30, 30, 10]
    samples = tar_samples(dest, manifest)
    assert samples == {key: {"jpg": expected[key][0], "txt": caption_for(key + ".jpg")} for key in keys}
    assert stream_captions(str(dest), 100) == {key: caption_for(key + ".jpg") for key in keys}


def refused(argv: list[str], dest: Path, capsys) -> str:
    """The one-line message of a refused `shards make`; DEST must hold nothing afterwards."""
    assert cli.main(["shards", "make", *argv, str(dest)]) == 2
    err = capsys.readouterr().err
    assert not dest.exists() or not any(dest.iterdir()), sorted(dest.iterdir())
    return err


def test_bad_caption_files_are_refused_before_writing(source, expected, tmp_path, capsys):
    keys = sorted(expected)
    good = [{"image": f"{key}.jpg", "caption": "a photo"} for key in keys[:5]]
    dest = tmp_path / "out"
    cases = {
        "missing.csv": (good[:2] + [{"image": "cat/nope.jpg", "caption": "x"}],
                        r"captions/missing.csv row 3: image 'cat/nope.jpg' does not exist in .*: fix the path"),
        "columns.parquet": ([{"file": r["image"], "text": r["caption"]} for r in good],
                            r"has no column 'image', 'caption' \(columns: file, text\): .*--image-column / "
                            r"--caption-column"),
        "empty.jsonl": (good[:3] + [{"image": f"{keys[9]}.jpg", "caption": "  "}],
                        r"empty.jsonl row 4: the caption is empty: write its caption or remove the row"),
        "twice.csv": (good + good[1:2], r"twice.csv row 6: image .* is already named by row 2"),
    }
    (tmp_path / "captions").mkdir()
    for name, (rows, message) in cases.items():
        write_table(tmp_path / "captions" / name, rows)
        err = refused([str(source), "--captions", str(tmp_path / "captions" / name)], dest, capsys)
        assert len(err.strip().splitlines()) == 1
        assert re.search(message, err), err

    latin1 = tmp_path / "captions" / "latin1.csv"
    latin1.write_bytes(b"image,caption\n" + f"{keys[0]}.jpg,ok\n{keys[1]}.jpg,caf".encode() + b"\xe9\n")
    err = refused([str(source), "--captions", str(latin1)], dest, capsys)
    assert "latin1.csv row 2: the caption is not UTF-8 text" in err
    bad_json = tmp_path / "captions" / "latin1.jsonl"
    bad_json.write_bytes(b'{"image": "' + keys[0].encode() + b'.jpg", "caption": "caf\xe9"}\n')
    assert "latin1.jsonl row 1 is not a UTF-8 JSON object" in refused([str(source), "--captions", str(bad_json)],
                                                                      dest, capsys)


def test_bad_captions_beside_images_are_refused_before_writing(source, tmp_path, capsys):
    def folder(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(source, root)
        for image in root.rglob("*.jpg"):
            image.with_suffix(".txt").write_text("a photo", encoding="utf-8")
        return root

    dest = tmp_path / "out"
    empty = folder("empty")
    (empty / "cat" / "0003.txt").write_bytes(b"")
    victim = next(iter(sorted((empty / "dog").glob("*.txt"))))
    victim.write_bytes(b"\n \n")
    err = refused([str(empty)], dest, capsys)
    assert "empty/cat/0003.txt of image cat/0003.jpg is empty: write its caption" in err, err  # the first, sorted
    (empty / "cat" / "0003.txt").write_bytes(b"a cat")
    assert f"empty/dog/{victim.name} of image dog/{victim.stem}.jpg is empty" in refused([str(empty)], dest, capsys)

    latin1 = folder("latin1")
    (latin1 / "cat" / "0003.txt").write_bytes("café".encode("latin-1"))
    assert "latin1/cat/0003.txt of image cat/0003.jpg is not UTF-8 text" in refused([str(latin1)], dest, capsys)

    partial = folder("partial")
    (partial / "cat" / "0003.txt").unlink()
    err = refused([str(partial)], dest, capsys)
    assert "1 of 200 images in" in err and "have no caption beside them (e.g. cat/0003.jpg)" in err


def test_oversized_captions_are_refused_unread(source, expected, tmp_path, capsys):
    import tracemalloc

    root = tmp_path / "src"
    shutil.copytree(source, root)
    for image in root.rglob("*.jpg"):
        image.with_suffix(".txt").write_text("a photo", encoding="utf-8")
    with open(root / "cat" / "0003.txt", "r+b") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB of zero bytes, UTF-8 and not blank, yet no caption
    dest = tmp_path / "out"
    tracemalloc.start()
    try:
        err = refused([str(root)], dest, capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert re.search(r"caption .*src/cat/0003.txt of image cat/0003.jpg is 67108864 bytes, over the 1048576 "
                     r"a caption may take: ", err), err
    keys = sorted(expected)
    table = tmp_path / "long.jsonl"
    write_table(table, [{"image": f"{keys[0]}.jpg", "caption": "x" * (2**20 + 1)}])
    err = refused([str(source), "--captions", str(table)], dest, capsys)
    assert "long.jsonl row 1: the caption is 1048577 bytes, over the 1048576 a caption may take" in err, err


def test_index_records_the_fields_of_shardwriter_shards(flat, tmp_path):
    import webdataset as wds

    root, expected = flat
    folder = tmp_path / "wds"
    folder.mkdir()
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=64) as writer:
        for key, (image, caption) in sorted(expected.items()):
            writer.write({"__key__": key, "jpg": image, "txt": caption, "json": {"caption": caption.decode()}})
    manifest = shards.index_shards(str(folder), workers=2)
    assert manifest["fields"] == ["jpg", "json", "txt"]
    assert shards.read_manifest(str(folder))["fields"] == ["jpg", "json", "txt"]
    assert stream_captions(str(folder), 200) == {key: caption for key, (_, caption) in expected.items()}


def test_caption_rule_is_the_streams_rule_for_txt():
    """make refuses a caption exactly when decode.py would skip its .txt, or it is empty."""
    for raw in [b"ok", "☃ café".encode(), b"caf\xe9", b"\xff\xfe", b"\xed\xa0\x80", b"", b" \n", b"a\x00b"]:
        try:
            decode.field_value("k", "txt", raw)
            streams = True
        except decode.DecodeError:
            streams = False
        assert (caption_problem(raw) is None) == (streams and bool(raw.strip())), raw


def test_manifest_fields_are_optional_and_checked(local, tmp_path):
    dest, manifest = local
    older = {key: value for key, value in manifest.items() if key != "fields"}
    (tmp_path / "old").mkdir()
    for shard in manifest["shards"]:
        for name in (shard["url"], shard["index"]):
            shutil.copy(dest / name, tmp_path / "old" / name)
    (tmp_path / "old" / "index.json").write_text(json.dumps(older))
    assert shards.read_manifest(str(tmp_path / "old")) == older  # written before "fields" existed
    (tmp_path / "old" / "index.json").write_text(json.dumps({**older, "fields": "jpg"}))
    with pytest.raises(shards.ShardError, match="'fields' must be a list of member extensions"):
        shards.read_manifest(str(tmp_path / "old"))
