"""Converting a GGUF checkpoint into a Hugging Face folder that vLLM serves (run as its own process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Load the GGUF with transformers (dequantizing it) and save safetensors, tokenizer and chat template."""
    # Imported here: torch and transformers take seconds and hundreds of MB; only this process pays for them.
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"Converting {gguf.name}", unit="step", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    steps.update()
    # The weights are plain tensors now; without this transformers refuses to save a "GGUF-quantized" model.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    steps.update()
    steps.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    convert_gguf(args.gguf, args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
