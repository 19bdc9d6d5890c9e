#!/usr/bin/env python3
"""Writes the crafted broken safetensors files used by tests/test_safetensors.cpp (run from anywhere).
Each file breaks exactly one rule of the format; the rest is valid."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))


def raw(name, blob):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(blob)


def st(name, header_text, data=b"", header_len=None):
    h = header_text.encode()
    h += b" " * (-len(h) % 8)
    n = len(h) if header_len is None else header_len
    raw(name, struct.pack("<Q", n) + h + data)


def hdr(tensors, metadata=None):
    d = {}
    if metadata is not None:
        d["__metadata__"] = metadata
    d.update(tensors)
    return json.dumps(d)


def t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


F = bytes(range(16))  # 16 data bytes: four F32 values

raw("truncated.safetensors", b"\x10\x00\x00")
st("header_absurd.safetensors", "{}", header_len=1 << 40)
st("header_past_end.safetensors", hdr({"w": t("F32", [4], 0, 16)}), F, header_len=4096)
st("not_json.safetensors", '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]', F)
st("not_object.safetensors", "[1, 2, 3]", F)
st("bad_dtype.safetensors", hdr({"w": t("F17", [4], 0, 16)}), F)
st("negative_dim.safetensors", hdr({"w": t("F32", [-4], 0, 16)}), F)
st("numel_overflow.safetensors", hdr({"w": t("F32", [1 << 40, 1 << 40], 0, 16)}), F)
st("bad_offsets.safetensors", hdr({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}), F)
st("offsets_reversed.safetensors", hdr({"w": t("F32", [0], 16, 8)}), F)
st("offsets_past_end.safetensors", hdr({"w": t("F32", [4], 0, 16), "lm_head.weight": t("F32", [4], 16, 32)}), F)
st("size_mismatch.safetensors", hdr({"w": t("F32", [3], 0, 16)}), F)
st("overlap.safetensors", hdr({"a": t("F32", [3], 0, 12), "b": t("F32", [2], 8, 16)}), F)
st("dup_key.safetensors",
   '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
   '"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', F)
st("metadata_not_string.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"step": 3}), F)
st("hash_mismatch.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"xxh64.w": "0000000000000000"}), F)
st("hash_orphan.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"xxh64.gone": "0000000000000000"}), F)
