"""Embedding requests as the gateway routes them: the domain types the front doors (gRPC,
/v1/embeddings, the CLI through gRPC) translate to and from."""

from dataclasses import dataclass

import numpy as np

from airouter.errors import InvalidArgument

# Inputs one request may carry (OpenAI's limit), checked before any host is asked.
MAX_INPUTS = 2048


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    inputs: list[str | list[int]]  # texts, or token ids of the model's vocabulary
    dimensions: int | None = None
    request_id: str = ""
    key: str = ""  # the API key it came with (its name); "" for a token

    def validate(self) -> None:
        if not self.inputs:
            raise InvalidArgument("input is empty; send a text, a list of texts, or token ids")
        if len(self.inputs) > MAX_INPUTS:
            raise InvalidArgument(
                f"input has {len(self.inputs)} items; at most {MAX_INPUTS} are allowed, send "
                "the rest in further requests"
            )
        if self.dimensions is not None and self.dimensions < 1:
            raise InvalidArgument(f"dimensions is {self.dimensions}; it must be at least 1")


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32, one row per input, in input order
    prompt_tokens: int
    model: str  # the configured name of the model that made them
    host: str
