"""The errors users see, each a single line naming the problem and the fix, in two kinds.

`RequestError` is the request's fault (a bad size, an unknown LoRA, a bad cache spec): it names the input in the
runtime's vocabulary (`height`, `num_images_per_prompt`, `guidance_scale`, `image`, `cache`, …) and carries the
problem and the fix as data, so that each front end words it in its own terms (`Terms`): the CLI names flags
(`--num-images`), Triton its inputs (`num_images`). `InternalError` is ours: a component or an engine failed on a
request that was valid. Anything else raised as a plain `FluxExportError` is a refusal outside a request (a
missing folder, a bad export option).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# the placeholders a RequestError's text may hold, each worded by the front end's Terms
PLACEHOLDERS = ("{name}", "{option}", "{given}", "{drop}")


class FluxExportError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""


@dataclass(frozen=True)
class Terms:
    """How a front end names a request's inputs: `names` maps a field (runtime vocabulary) to the front end's name
    for it (a field not in it keeps its own); the patterns word a reference to it (`{name}` is that name)."""

    names: Mapping[str, str] = field(default_factory=dict)
    option: str = "{name}"  # the input itself: "--prompt-2" | "prompt_2"
    given: str = "in {name}"  # where a value is given: "with --prompt" | "in the prompt input"
    drop: str = "drop {name}"  # the fix of leaving it out: "drop --prompt-2" | "drop the prompt_2 input"
    pointer: str = ""  # after a message about the input: " (--height)" | ""

    def name(self, request_field: str) -> str:
        return self.names.get(request_field, request_field)


LIBRARY_TERMS = Terms()  # the runtime's own vocabulary (str() of a RequestError)


class RequestError(FluxExportError):
    """The request's fault: `field` names the input (runtime vocabulary); `problem` and `fix` may refer to it as
    `{name}`, `{option}`, `{given}` or `{drop}`, worded by each front end's Terms; `pointer` says whether the front
    end points at the input after the message (the CLI's ` (--height)`)."""

    def __init__(self, field: str, problem: str, fix: str = "", *, pointer: bool = True, literal: bool = False):
        self.field, self.problem, self.fix, self.pointer, self.literal = field, problem, fix, pointer, literal
        super().__init__(self.render(LIBRARY_TERMS))

    def render(self, terms: Terms) -> str:
        """The one-line message in `terms`."""
        name = terms.name(self.field)
        words = {
            "{name}": name,
            "{option}": terms.option.replace("{name}", name),
            "{given}": terms.given.replace("{name}", name),
            "{drop}": terms.drop.replace("{name}", name),
        }
        text = f"{self.problem}: {self.fix}" if self.fix else self.problem
        for placeholder in () if self.literal else PLACEHOLDERS:
            text = text.replace(placeholder, words[placeholder])
        if self.pointer:
            text += terms.pointer.replace("{name}", name)
        return " ".join(text.splitlines())

    @classmethod
    def of(cls, error: FluxExportError, field: str) -> RequestError:
        """A refusal raised as a plain FluxExportError while a request was being checked, as the request's fault
        (its message kept word for word, no pointer added)."""
        if isinstance(error, RequestError):
            return error
        return cls(field, str(error), pointer=False, literal=True)


class InternalError(FluxExportError):
    """Our fault: a component (`component`) or an engine failed on a valid request; servers answer it as an
    internal error (HTTP 500), not as the client's."""

    def __init__(self, message: str, component: str | None = None):
        self.component = component
        super().__init__(message)
