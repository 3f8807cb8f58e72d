"""Chat messages to a prompt, through the model's own `tokenizer.chat_template`, as llama.cpp and transformers do.

The template comes from the model file, so it is untrusted code: it is rendered in Jinja2's
`ImmutableSandboxedEnvironment` (no attribute access to internals, no mutation of the messages), with the
variables and helpers that Hugging Face templates expect (`messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`, `strftime_now`).

Untrusted code may also never end: a render stops after RENDER_LIMIT seconds, or as soon as its request is
cancelled (`workers.inference.watchdog`). The single operations that build a huge value in one native call,
which no watchdog stops, are bounded: `*` to MAX_BUILT characters or items, `**` to MAX_POWER bits, and field
widths (`%`, `str.format`, the `format`, `center` and `indent` filters) to MAX_BUILT. A template can still
grow a string by doubling it in a loop (`{% set s = s ~ s %}`) faster than the render limit: a model file is
trusted with the node's memory as its weights are.

A model without a template gets `PLAIN_TEMPLATE`, which writes each message as `Role: content` on its own
line and ends with `Assistant:`; its answers stop at `PLAIN_STOP` (the model starting the user's next turn).
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.filters
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from broker.errors import ChatTemplateError
from broker.openai import ChatMessage
from workers.inference.watchdog import Interrupted, interruptible

RENDER_LIMIT = 2.0
"""Seconds a chat template may take to render (real ones take well under a millisecond)."""
MAX_BUILT = 1 << 20
"""Characters (or items) one `*` in a template may build."""
MAX_POWER = 4096
"""Bits one `**` in a template may build."""

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ("\nUser:",)


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    """The rendered prompt, without a leading BOS text (the tokenizer adds BOS itself)."""
    stop: tuple[str, ...]
    """Stop strings the template implies (the plain template's next turn); the request's own come on top."""


def _raise(message: str) -> NoReturn:
    raise ChatTemplateError(f"The model's chat template refused these messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_NUMBER = re.compile(r"\d{7,}")


def _check_widths(fmt: Any) -> None:
    """Refuse a format string that asks for a field MAX_BUILT characters wide or more."""
    if isinstance(fmt, str) and any(int(n) >= MAX_BUILT for n in _NUMBER.findall(fmt)):
        raise SecurityError(f"the template formats a field of {MAX_BUILT} characters or more")


def _check_width(width: Any) -> None:
    if isinstance(width, int) and width >= MAX_BUILT:
        raise SecurityError(f"the template asks for a width of {MAX_BUILT} characters or more")


def _center(value: str, width: int = 80) -> str:
    _check_width(width)
    return jinja2.filters.do_center(value, width)


def _indent(value: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    _check_width(width)
    return jinja2.filters.do_indent(value, width, first, blank)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_widths(value)
    return jinja2.filters.do_format(value, *args, **kwargs)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with the operations that build a huge value in one native call bounded."""

    intercepted_binops = frozenset({"*", "**", "%"})

    # `str.format` and `format_map` calls: Jinja 3.1.5 and later wrap them when they are looked up
    # (`wrap_str_format`), earlier releases when they are called (`call`, which gets the bound method).

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_widths(getattr(value, "__self__", None))
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(__obj, "__name__", None) in ("format", "format_map"):
            _check_widths(getattr(__obj, "__self__", None))
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            _check_widths(left)
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_BUILT:
                    raise SecurityError(f"the template builds more than {MAX_BUILT} characters at once")
        powers = operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
        if powers and right > 0 and right * abs(left).bit_length() > MAX_POWER:
            raise SecurityError(f"the template computes a number of more than {MAX_POWER} bits")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
_ENV.filters.update(center=_center, indent=_indent, format=_format)
_ENV.globals.update(raise_exception=_raise, strftime_now=_strftime_now)


def render_chat(
    messages: Sequence[ChatMessage],
    *,
    template: str | None,
    bos_token: str = "",
    eos_token: str = "",
    stopped: Callable[[], bool] = lambda: False,
    limit: float = RENDER_LIMIT,
) -> ChatPrompt:
    """Render `messages` for the model; raises ChatTemplateError if the template fails, refuses them or takes
    more than RENDER_LIMIT seconds, and `Interrupted` if `stopped()` turns true while it renders."""
    source = template if template else PLAIN_TEMPLATE
    plain = not template
    payload: list[dict[str, Any]] = [{"role": m.role, "content": m.text} for m in messages]
    compiled = _compile(source)
    try:
        with interruptible(limit, stopped):
            text = compiled.render(
                messages=payload, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
            )
    except Interrupted as exc:
        if exc.why == "stopped":
            raise
        raise ChatTemplateError(
            f"The model's chat template did not finish within {limit:g} s (a loop without end?)."
        ) from None
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"The model's chat template failed: {type(exc).__name__}: {exc}") from exc
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token) :]
    return ChatPrompt(text=text, stop=PLAIN_STOP if plain else ())


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    # A model's template is rendered on every chat request; compiling it takes longer than rendering it.
    compiled = _COMPILED.get(source)
    if compiled is None:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        try:
            compiled = _COMPILED[source] = _ENV.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"The model's chat template does not compile: {exc}") from exc
    return compiled
