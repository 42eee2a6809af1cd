"""gptchat: build, train, fine-tune, evaluate and serve your own ChatGPT, in plain PyTorch.

    import gptchat
    lm = gptchat.load_model()                       # SmolLM2-135M-Instruct, embedded
    engine = gptchat.Engine(lm)
    chat = gptchat.ChatSession(engine, params=gptchat.SamplingParams(temperature=0))
    print("".join(d.text for d in chat.send("What is the capital of France?")))
"""

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so `gptchat --help` and flag errors do not wait for torch.
_EXPORTS = {
    "ContextLengthError": "errors", "GptchatError": "errors", "InvalidParameterError": "errors",
    "ModelLoadError": "errors",
    "SamplingParams": "sampling",
    "LoadedModel": "checkpoints", "default_model_path": "checkpoints", "load_model": "checkpoints",
    "Delta": "engine", "Engine": "engine", "GenerationResult": "engine",
    "ChatSession": "chat", "Conversation": "chat", "build_prompt": "chat",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'gptchat' has no attribute {name!r}")
