"""Sub-command `chatrl export`: a trained model folder to another runtime's format."""

from __future__ import annotations

import argparse

from chatrl.export.to_gguf import export_gguf


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model folder for llama.cpp / ollama (GGUF)",
                              description="Write a chat model folder (Llama architecture, e.g. SmolLM2 and what "
                                          "chatrl trained from it) as one GGUF file: weights, hyper-parameters, "
                                          "tokenizer and chat template. Run it with llama.cpp "
                                          "(llama-cli -m OUT.gguf) or ollama (a Modelfile with FROM ./OUT.gguf).")
    p.add_argument("model", metavar="MODEL_DIR", help="a chat model folder (e.g. runs/demo/ppo/actor) or an alias")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    p.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16",
                   help="type of the weight matrices (norms stay f32); f32 is exact (default: f16)")
    p.add_argument("--tokenizer-pre", default="auto", metavar="NAME",
                   help="llama.cpp's pre-tokenizer name; auto reads it from tokenizer.json (gpt-2, smollm)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_gguf(args.model, args.out, dtype=args.dtype, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0
