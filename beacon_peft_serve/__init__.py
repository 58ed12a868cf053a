"""beacon_peft_serve: serve compressed documents with a stock decoder (vLLM) from saved beacon memories.

A light sibling of ``beacon_peft``: it imports only torch, safetensors and the standard library (the vLLM
connector, `beacon_peft_serve.connector`, imports vLLM too), so it runs in a serving environment without
transformers' training stack or PEFT (``scripts/serve_setup.sh``). ``beacon_peft`` itself imports the saved
memory format and the weight fingerprint from here, so both read one format.

* `saved`: the folder a `BeaconMemory.save` writes (format checks, checksum, tensors), read without a model;
* `fingerprint`: the weights hash of a base model, from its module or its safetensors folder;
* `prefix`: a memory as a standard KV prefix (keys after RoPE at contiguous positions 0..M-1, values), what a
  plain decoder continues from (docs/semantics.md, "A memory as a KV prefix");
* `connector`: the vLLM v1 KV connector that loads a saved memory into a request's blocks; `cli`:
  ``beacon-peft-serve``, a stock ``vllm serve`` with that connector configured (docs/serving.md).
"""
