"""Export of compressed models to the runtimes people deploy with (GGUF for llama.cpp, DeciLM layout for vLLM).

A sibling of ``pruning``/``replacement``/``recovery``/``analysis``: plain arguments, imports only ``core`` (and
torch, numpy, gguf, transformers). ``recipes/export.py`` (``task=export``) composes it and runs the results in
the runtimes themselves.

- ``layout``: per-layer shapes read off the modules, what each format refuses (one line naming the feature),
  zero padding to one global head count / FFN multiple;
- ``to_gguf``: one GGUF file (llama.cpp's ``deci`` architecture for per-layer widths, ``llama`` otherwise);
- ``tokenizer``: ``tokenizer.ggml.*`` copied from a source GGUF or built from an HF tokenizer;
- ``decilm``: the DeciLM / Nemotron-NAS directory vLLM's ``DeciLMForCausalLM`` serves (``decilm_files``: its
  configuration and modeling code, copied in);
- ``hf``: a stock transformers Llama directory (no remote code);
- ``options``: ``conf/export/<format>.yaml``'s classes.
"""
