"""The generic text layer and chat templates, driven by a scripted model (no backend needed)."""

import threading
import time
from collections.abc import Callable, Generator, Sequence

import pytest

from broker.errors import ChatTemplateError, ContextLengthExceeded
from broker.openai import ChatMessage
from workers.inference.backend import InferenceModel, SamplingParams
from workers.inference.chat import PLAIN_STOP, RENDER_LIMIT, render_chat
from workers.inference.text import TextGeneration, token_budget
from workers.inference.watchdog import POLL, REFIRE, Interrupted, interruptible


class ScriptedModel:
    """Generates the byte pieces it is given, in order; counts how many tokens were computed."""

    context_length = 64
    chat_template = None
    bos_token = "<s>"
    eos_token = "</s>"

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)
        self.computed = 0
        self.closed = False

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return [1] * add_bos + [ord(c) for c in text]

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.pieces[i] for i in ids)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Generator[int, None, None]:
        try:
            for i in range(len(self.pieces)):
                self.computed += 1
                yield i
        finally:
            self.closed = True

    def cached(self) -> list[int]:
        return []  # it keeps nothing between generations


def run(pieces: list[bytes], **kwargs: object) -> tuple[list[str], TextGeneration]:
    gen = TextGeneration(ScriptedModel(pieces), [1, 2], **{"max_tokens": 100, **kwargs})  # type: ignore[arg-type]
    return list(gen), gen


def test_the_scripted_model_is_an_inference_model() -> None:
    assert isinstance(ScriptedModel([]), InferenceModel)


def test_text_until_the_end_token_finishes_with_stop() -> None:
    deltas, gen = run([b"Hello", b" world"])
    assert "".join(deltas) == "Hello world" and gen.finish_reason == "stop" and gen.completion_tokens == 2


def test_max_tokens_finishes_with_length_and_computes_no_more() -> None:
    model = ScriptedModel([b"a", b"b", b"c", b"d"])
    gen = TextGeneration(model, [1], max_tokens=2)
    assert "".join(gen) == "ab" and gen.finish_reason == "length" and gen.completion_tokens == 2
    assert model.computed == 2 and model.closed


def test_a_character_split_across_tokens_goes_out_whole() -> None:
    snowman = "☃".encode()
    deltas, _ = run([b"x", snowman[:1], snowman[1:2], snowman[2:], b"y"])
    assert deltas == ["x", "☃", "y"]


def test_a_stop_string_across_tokens_is_cut_and_never_leaks() -> None:
    deltas, gen = run([b"one ", b"tw", b"o thr", b"ee"], stop=["two"])
    assert "".join(deltas) == "one " and gen.finish_reason == "stop"
    assert all("t" not in d for d in deltas)


def test_a_held_back_prefix_that_is_not_a_stop_goes_out() -> None:
    deltas, gen = run([b"ab", b"c", b"d"], stop=["cx"])
    assert "".join(deltas) == "abcd" and gen.finish_reason == "stop"
    assert deltas[0] == "ab"  # "c" waited: it could have begun "cx"


def test_cancel_stops_within_one_token() -> None:
    model = ScriptedModel([b"a"] * 50)
    flag = {"stop": False}
    gen = TextGeneration(model, [1], max_tokens=50, cancelled=lambda: flag["stop"])
    for i, _ in enumerate(gen):
        if i == 3:
            flag["stop"] = True
    assert gen.finish_reason == "cancelled" and model.computed == 4 and model.closed


def test_token_budget_names_both_numbers() -> None:
    assert token_budget(10, None, 64) == 54
    assert token_budget(10, 54, 64) == 54
    with pytest.raises(ContextLengthExceeded) as info:
        token_budget(10, 60, 64)
    assert "10 tokens" in info.value.message and "60" in info.value.message and "64" in info.value.message
    with pytest.raises(ContextLengthExceeded):
        token_budget(64, None, 64)


def messages(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]  # type: ignore[arg-type]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_models_template_renders_the_conversation() -> None:
    prompt = render_chat(messages(("system", "Be brief."), ("user", "Hi")), template=CHATML)
    assert (
        prompt.text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.stop == ()


def test_a_leading_bos_text_is_left_to_the_tokenizer() -> None:
    prompt = render_chat(
        messages(("user", "Hi")), template="{{ bos_token }}[{{ messages[0].content }}]", bos_token="<s>"
    )
    assert prompt.text == "[Hi]"


def test_without_a_template_the_plain_one_is_used() -> None:
    prompt = render_chat(messages(("system", "S"), ("user", "Hi")), template=None)
    assert prompt.text == "System: S\nUser: Hi\nAssistant:" and prompt.stop == PLAIN_STOP


def test_a_template_that_refuses_is_a_chat_template_error() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat(messages(("assistant", "x")), template=template)


def test_the_template_runs_in_a_sandbox() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(messages(("user", "x")), template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        render_chat(messages(("user", "x")), template="{% do messages.append(1) %}")
    with pytest.raises(ChatTemplateError):
        render_chat(messages(("user", "x")), template="{% for %}")


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}never"


def test_a_template_that_never_ends_is_stopped_after_the_render_limit() -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="did not finish within"):
        render_chat(messages(("user", "x")), template=LOOP)
    assert time.monotonic() - started < RENDER_LIMIT + 2


@pytest.mark.parametrize(
    "body",
    [
        "",
        "{% if j > i %}{% endif %}",  # Jinja rewrote the traceback of an interruption here, and failed (TypeError)
        "{{ nope is sequence }}",  # its test catches Exception around a __len__ call: a plain one was swallowed
    ],
)
def test_any_loop_is_stopped_as_a_template_error(body: str) -> None:
    template = "{% for i in range(100000) %}{% for j in range(100000) %}" + body + "{% endfor %}{% endfor %}"
    for _ in range(8):
        started = time.monotonic()
        with pytest.raises(ChatTemplateError, match=r"did not finish within 0\.05 s"):
            render_chat(messages(("user", "x")), template=template, limit=0.05)
        assert time.monotonic() - started < 0.05 + POLL + REFIRE + 0.5


def test_a_render_stops_once_its_request_is_cancelled() -> None:
    cancelled = threading.Event()
    threading.Timer(0.2, cancelled.set).start()
    with pytest.raises(Interrupted) as stopped:
        render_chat(messages(("user", "x")), template=LOOP, stopped=cancelled.is_set)
    assert stopped.value.why == "stopped"


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 100000000 }}",
        "{{ [0] * 100000000 }}",
        "{{ 9 ** 100000000 }}",
        "{{ '%0300000000d' % 1 }}",
        "{{ '{:0300000000d}'.format(1) }}",
        "{{ '%0300000000d' | format(1) }}",
        "{{ 'x' | center(300000000) }}",
        "{{ 'x' | indent(300000000, true) }}",
    ],
)
def test_one_operation_cannot_build_something_huge(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render_chat(messages(("user", "x")), template=template)


def test_small_products_powers_and_widths_still_render() -> None:
    template = "{{ messages[0]['content'] * 2 }}{{ 2 ** 10 }}{{ '%03d' % 7 }}"
    template += "{{ '{:>4}'.format('a') }}{{ 'b' | center(3) }}"
    assert render_chat(messages(("user", "ab")), template=template).text == "abab1024007   a b "


def test_an_interruption_never_outlives_its_block() -> None:
    """A block that ends just as its limit passes: the exception is raised in it, or taken back, never later."""
    for _ in range(30):
        try:
            with interruptible(0.0):
                deadline = time.monotonic() + POLL * 1.2
                while time.monotonic() < deadline:
                    pass
        except Interrupted:
            pass
        spin = time.monotonic() + 0.002
        while time.monotonic() < spin:  # an exception still pending would go off here
            pass
