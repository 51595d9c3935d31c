"""What the reader's ranged reads go through: `shards.parse_samples`, the fast parser of a byte range
holding many samples, against the reference parser (webdataset's writer for PAX members,
`shards.parse_members` per sample), on real CIFAR shards; a read cut short, a corrupt header
and a wrong offset are errors of those samples only."""

from __future__ import annotations

import numpy as np

from ssl_dist import shards


def test_parse_samples_matches_the_reference_parser(cifar_local, tmp_path):
    import webdataset as wds

    folder, manifest = cifar_local
    pax = tmp_path / "pax"
    pax.mkdir()
    items = shards.group_samples(shards.parse_members((folder / "shard-000000.tar").read_bytes()))
    with wds.TarWriter(str(pax / "p.tar")) as writer:  # PAX headers on every member: the slow path
        for key, fields in items:
            writer.write({"__key__": key, **fields})
    pax_manifest = shards.index_shards(str(pax), workers=1)
    for where, entry in [(folder, s) for s in manifest["shards"][:3]] + [(pax, pax_manifest["shards"][0])]:
        blob = (where / entry["url"]).read_bytes()
        offsets = shards.read_offsets(str(where), entry).astype(np.int64)
        ends = np.append(offsets[1:], entry["size"])
        expected = [shards.group_samples(shards.parse_members(blob[a:z]))[0] for a, z in zip(offsets, ends)]
        assert shards.parse_samples(blob, offsets, ends) == expected
        # a read that starts at sample 5 and stops short (a truncated shard): the last samples are cut short
        base = int(offsets[5])
        cut = blob[base:int(offsets[9]) + 700]
        got = shards.parse_samples(cut, offsets[5:12] - base, ends[5:12] - base)
        assert got[:4] == expected[5:9]
        assert all(isinstance(g, shards.ShardError) and "cut short" in str(g) for g in got[4:])
    # a corrupt header (checksum) and a wrong offset are errors of that sample only
    blob = bytearray((folder / "shard-000001.tar").read_bytes())
    offsets = shards.read_offsets(str(folder), manifest["shards"][1]).astype(np.int64)
    ends = np.append(offsets[1:], len(blob))
    blob[int(offsets[2]) + 10] ^= 0x20  # a letter of the name: the stored checksum no longer matches
    got = shards.parse_samples(bytes(blob), offsets, ends)
    assert isinstance(got[2], shards.ShardError) and "checksum" in str(got[2])
    assert all(isinstance(g, tuple) for i, g in enumerate(got) if i != 2)
    shifted = shards.parse_samples(bytes(blob), offsets[3:5] + 512, ends[3:5])
    assert all(isinstance(g, shards.ShardError) for g in shifted)
