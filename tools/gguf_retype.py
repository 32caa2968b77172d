"""Rewrite a GGUF file with its tensors dequantized to F32 or F16, metadata unchanged: the llama.cpp peer of
`bench latency --compare-llamacpp` at the engine's precision class (the engine dequantizes the built-in Q4_1 file to
fp32 or bf16; llama.cpp then reads F32 or F16 weights, not its 4-bit kernels).

    python tools/gguf_retype.py IN.gguf OUT.gguf --type f16     # 2-D weights F16, norms F32 (llama.cpp's layout)
    python tools/gguf_retype.py IN.gguf OUT.gguf --type f32

Needs the `gguf` package (it comes with llama-cpp-python). A benchmark aid, not part of the engine."""
from __future__ import annotations

import argparse
import sys

import numpy as np


def retype(src: str, dst: str, to: str) -> int:
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_F16 if to == "f16" else gguf.LlamaFileType.ALL_F32)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(d) for d in reversed(t.shape.tolist())])  # GGUF lists dims fastest first
        if to == "f16" and data.ndim >= 2:
            data = data.astype(np.float16)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(reader.tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="input GGUF (any tensor types gguf-py can dequantize, e.g. Q4_1, Q8_0)")
    p.add_argument("dst", help="output GGUF path")
    p.add_argument("--type", choices=["f32", "f16"], required=True, help="tensor type of the output's weights")
    args = p.parse_args(argv)
    n = retype(args.src, args.dst, args.type)
    print(f"wrote {args.dst}: {n} tensors as {args.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
