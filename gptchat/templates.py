"""Chat templates: turn a list of messages into the one prompt string a model was trained on.

Models ship their chat format as a Jinja template (in tokenizer_config.json, a chat_template.jinja
file, or GGUF metadata). We render it the way transformers' `apply_chat_template` does, so that a
model sees exactly the prompt it would see there: same Jinja settings, same helper functions, and a
sandbox, because templates come from model files we did not write.
"""

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptchat.errors import GptchatError

# The fallback for a model that has no template of its own. ChatML is what most small chat models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part for training masks.

    transformers understands it, so some templates use it; for rendering it just emits its body.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    # Templates call this to reject a conversation (e.g. "roles must alternate").
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, > and &, which would change the prompt; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra,
) -> str:
    """The prompt text for `messages` (OpenAI-style {"role", "content"} dicts) under `template`.

    `template` None means ChatML. `extra` goes to the template as variables (e.g. tools, or
    enable_thinking for templates that read it). Any failure, including a template's own
    `raise_exception`, becomes a GptchatError carrying the template's message.
    """
    # Like transformers: a None field (OpenAI sends content=None next to tool_calls) is left out, and
    # tools/documents are None unless given, so templates testing `tools is not none` behave.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, **extra}
    try:
        return _compile(template if template is not None else CHATML_TEMPLATE).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:  # syntax errors, sandbox violations, raise_exception
        raise GptchatError(f"chat template error: {e}") from e
    except Exception as e:  # a template can also fail in plain Python (e.g. a bad index or a type error)
        raise GptchatError(f"chat template error: {type(e).__name__}: {e}") from e
