"""gptchat: build, train, fine-tune, evaluate and serve your own ChatGPT, in plain PyTorch.

    import gptchat
    lm = gptchat.load_model()                       # SmolLM2-135M-Instruct, embedded
    engine = gptchat.Engine(lm)
    chat = gptchat.ChatSession(engine, params=gptchat.SamplingParams(temperature=0))
    print("".join(d.text for d in chat.send("What is the capital of France?")))
"""

__version__ = "0.1.0"

from .errors import ContextLengthError, GptchatError, InvalidParameterError, ModelLoadError  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .checkpoints import LoadedModel, default_model_path, load_model  # noqa: E402
from .engine import Delta, Engine, GenerationResult  # noqa: E402
from .chat import ChatSession, Conversation, build_prompt  # noqa: E402

__all__ = [
    "ChatSession", "ContextLengthError", "Conversation", "Delta", "Engine", "GenerationResult", "GptchatError",
    "InvalidParameterError", "LoadedModel", "ModelLoadError", "SamplingParams", "build_prompt",
    "default_model_path", "load_model",
]
