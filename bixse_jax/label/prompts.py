"""The judge's prompt: a template with `{query}` and `{document}`, wrapped in the model's chat template.

The default follows UMBRELA (Upadhyay et al., 2024, the open reproduction of Bing's TREC relevance
prompt) on the 0-3 scale, shortened to answer at once: the grade must be the first token the model
emits, because the label is read from that token's distribution, not from generated text.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from bixse_jax.errors import UserError

DEFAULT_TEMPLATE = """Given a query and a passage, grade how relevant the passage is to the query on an integer scale of 0 to 3:
3 = the passage is dedicated to the query and contains the exact answer.
2 = the passage has some answer for the query, but the answer may be a bit unclear, or hidden amongst extraneous information.
1 = the passage seems related to the query but does not answer it.
0 = the passage has nothing to do with the query.

Query: {query}
Passage: {document}

Answer with the grade only, a single digit from 0 to 3."""

PLACEHOLDERS = ("{query}", "{document}")
_FIELD = re.compile(r"\{(query|document)\}")


class PromptError(UserError):
    """A prompt template or chat template that cannot be used."""


def load_template(path: str | os.PathLike | None) -> str:
    """The template file's text (DEFAULT_TEMPLATE without one); it must hold {query} and {document}."""
    if path is None:
        return DEFAULT_TEMPLATE
    text = pathlib.Path(path).read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise PromptError(f"{path}: prompt template lacks {', '.join(missing)}")
    return text


def fill(template: str, query: str, document: str) -> str:
    """The template with both fields in, in one pass: other braces, and a query that happens to
    hold "{document}", stay as they are."""
    values = {"query": query, "document": document}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def read_chat_template(model_path: str | os.PathLike, model_dir: pathlib.Path) -> str | None:
    """The model's chat template: GGUF metadata `tokenizer.chat_template` for a .gguf file, else the
    folder's chat_template.jinja or tokenizer_config.json `chat_template`; None when it has none."""
    path = pathlib.Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        from bixse_jax.models import gguf_io
        return gguf_io.chat_template(path)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def special_tokens(model_dir: pathlib.Path) -> dict[str, str]:
    """bos_token / eos_token strings that chat templates refer to, from tokenizer_config.json."""
    config = model_dir / "tokenizer_config.json"
    out = {"bos_token": "", "eos_token": ""}
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key in out:
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


class PromptBuilder:
    """(query, document) -> the text the model reads, ending where the grade token should come."""

    def __init__(self, template: str, chat_template: str | None = None, **template_vars: str):
        self.template = template
        self.chat_template = chat_template
        self._compiled = None
        if chat_template is not None:
            try:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as e:
                raise PromptError("a chat template needs jinja2 (pip install 'bixse-jax[label]')") from e

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._compiled = env.from_string(chat_template)
            except jinja2.exceptions.TemplateError as e:
                raise PromptError(f"cannot compile the chat template: {e}") from e
        self._vars = template_vars

    @property
    def uses_chat_template(self) -> bool:
        return self._compiled is not None

    def user_message(self, query: str, document: str) -> str:
        return fill(self.template, query, document)

    def build(self, query: str, document: str) -> str:
        message = self.user_message(query, document)
        if self._compiled is None:
            return message
        return self._compiled.render(messages=[{"role": "user", "content": message}],
                                     add_generation_prompt=True, **self._vars)
