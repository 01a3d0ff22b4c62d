"""The contract between the two sides of plasticity: what crosses a process boundary, defined once.

The plugin side (vllm_plasticity: the API server and vLLM's worker) and the training side
(plasticity_training: the trainer subprocess, the CLI, extraction) meet only here. This package imports
torch, safetensors and pydantic, never vLLM, nothing else of vllm_plasticity and nothing of
plasticity_training (tests/test_import_graph.py checks it):

    weights.py   the weight manifest: export in the worker, map in the trainer
    messages.py  the trainer's ZMQ requests and replies, and the kinds of error a reply carries
    settings.py  /train's optimizer and parameter-filter settings: one set of defaults and bounds
    bank.py      the concept-bank format on disk and the readout capacity rule
    files.py     atomic writes and the path-inside-a-directory rule
    architectures.py  every architecture served: the one table both sides derive their lists from
    chat_samples.py  OpenAI fine-tuning lines -> /train samples with a chat template (`plasticity train`,
                     the server's /train/convert); transformers only to read a tokenizer's end token
"""
