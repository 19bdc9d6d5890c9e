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
st("gap.safetensors", hdr({"a": t("F32", [1], 0, 4), "b": t("F32", [2], 8, 16)}), F)
st("trailing_bytes.safetensors", hdr({"w": t("F32", [2], 0, 8)}), F)
st("dup_key.safetensors",
   '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
   '"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', F)
st("metadata_not_string.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"step": 3}), F)
st("hash_mismatch.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"xxh64.w": "0000000000000000"}), F)
st("hash_orphan.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"xxh64.gone": "0000000000000000"}), F)

# ---- hostile inputs for the other readers (tests/test_hostile.cpp) ----


def write(name, blob):
    path = os.path.join(HERE, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob if isinstance(blob, bytes) else blob.encode("utf-8"))


NAN4 = struct.pack("<4f", 1.0, float("nan"), float("inf"), 2.0)
st("nan_weights.safetensors", hdr({"w": t("F32", [4], 0, 16), "ok": t("F32", [4], 16, 32)}), NAN4 + F)


def ckpt(name, edit, meta_extra=None):
    """A PSA checkpoint folder whose metadata config (the golden one) is edited by `edit`; one small tensor."""
    with open(os.path.join(HERE, "..", "psa_golden", "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    meta = {"format": "pt", "stage": "base", "config": json.dumps(cfg)}
    meta.update(meta_extra or {})
    h = hdr({"w": t("F32", [4], 0, 16)}, meta).encode()
    h += b" " * (-len(h) % 8)
    write(name + "/model.safetensors", struct.pack("<Q", len(h)) + h + F)


ckpt("ckpt_zero_heads", lambda c: c["text_config"].update(num_attention_heads=0))
ckpt("ckpt_absurd_dims", lambda c: c["text_config"].update(vocab_size=1 << 22, hidden_size=1 << 16, num_attention_heads=1,
                                                                  num_key_value_heads=1))
ckpt("ckpt_bad_lora", lambda c: None, {"lora": '{"rank": -3, "alpha": 8, "dropout": 0, "include_lm_head": false}'})
ckpt("ckpt_config_not_json", lambda c: None, {"config": '{"preset": "golden",'})
ckpt("ckpt_bad_head_query", lambda c: c.update(head_query="last_token"))

# Training states (psa/train.cpp): a step that is not a number.
st("state_bad_step.safetensors", hdr({"w": t("F32", [4], 0, 16)}, {"step": "-5", "epoch": "0", "offset": "0"}), F)


def tokenizer(name, edit, raw_bytes=None):
    specials = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_map = dict(zip(bs, cs))
    tok = {"format": "psa-bpe-tokenizer", "version": 1, "special_tokens": {s: i for i, s in enumerate(specials)},
           "vocab": specials + [chr(byte_map[b]) for b in range(256)], "merges": []}
    edit(tok)
    text = json.dumps(tok, ensure_ascii=False)
    write(name, raw_bytes(text) if raw_bytes else text)


tokenizer("tokenizer_unknown_key.json", lambda t: t.update(merge=[]))
tokenizer("tokenizer_special_out_of_range.json", lambda t: t["special_tokens"].update({"<unk>": 5000}))
tokenizer("tokenizer_merge_unknown.json", lambda t: t.update(merges=["a zz"]))
# Non-UTF-8 text: a raw 0xFF byte inside the vocabulary.
tokenizer("tokenizer_not_utf8.json", lambda t: None, lambda s: s.encode().replace(b'"a"', b'"\xff"', 1))

# Images: the fuzzer's JPEG (jpeg_dht_overflow.jpg, kept as found) plus hand-made headers.
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind, data):
    import zlib
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


write("image_huge.png", PNG_SIG + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 10, 8, 2, 0, 0, 0)))
write("image_zero_width.png", PNG_SIG + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)))
write("image_truncated.png", PNG_SIG + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)))
# Palette indices past the palette (stb_image 2.27 does not check them): an 8x8 PNG with 4 PLTE entries and
# indices 0..63, and an 8x8 8-bit BMP with 2 colours and indices 0..231.
def png_idat(rows):
    import zlib
    return png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + r for r in rows)))


write("image_palette_past_plte.png", PNG_SIG + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 3, 0, 0, 0)) +
      png_chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])) +
      png_idat([bytes(range(8 * y, 8 * y + 8)) for y in range(8)]) + png_chunk(b"IEND", b""))
bmp_pixels = b"".join(bytes(range(32 * y, 32 * y + 8)) for y in range(8))  # 8 bytes a row: no padding
bmp_info = struct.pack("<IiiHHIIiiII", 40, 8, 8, 1, 8, 0, len(bmp_pixels), 2835, 2835, 2, 0)
bmp_palette = bytes([0, 0, 255, 0, 0, 255, 0, 0])  # BGRx: red, green
write("image_palette_past_colours.bmp", b"BM" + struct.pack("<IHHI", 14 + 40 + 8 + len(bmp_pixels), 0, 0, 14 + 40 + 8) +
      bmp_info + bmp_palette + bmp_pixels)
write("image.gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")

# JSONL records: invalid UTF-8, a raw NUL byte, nesting 10000 deep, a duplicate key, a number out of range and
# an escaped NUL in the image path.
write("records_hostile.jsonl",
      b'{"safe_level": 0, "safe_type": 6, "image": "a.png", "conversations": [{"from": "USER", "value": "\xff\xfe"}]}\n'
      b'{"safe_level": 0, "safe_type": 6, "image": "a\x00.png"}\n' + b"[" * 10000 + b"\n"
      b'{"safe_level": 0, "safe_level": 1, "safe_type": 6}\n'
      b'{"safe_level": 1e400, "safe_type": 6}\n'
      b'{"safe_level": 0, "safe_type": 6, "image": "a\\u0000.png", "conversations": []}\n')
