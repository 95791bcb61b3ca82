"""Coverage-guided fuzzing of the collector's decoder with atheris (libFuzzer).

``python -m tools.fuzz_decoder -runs=N`` (any libFuzzer option). The first input byte
picks the content type, the rest is the message body. The run fails (with the input saved by
libFuzzer) when the decoder raises, gives an unknown reason, or neither decodes nor counts a
body that is not an empty batch.
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from services.collector.decode import REASONS, Decoder

CONTENT_TYPES = (
    "application/json",
    "",
    "application/x-msgpack",
    "application/x-yaml",
    "application/x-python-serialize",
    "text/plain",
)
DECODER = Decoder(1024)


def one_input(data: bytes) -> None:
    if not data:
        return
    content_type = CONTENT_TYPES[data[0] % len(CONTENT_TYPES)]
    body = data[1:]
    result = DECODER.decode(body, content_type, "utf-8", 1.0)
    for bad in result.bad:
        if bad.reason not in REASONS or len(bad.sample) > 512:
            raise AssertionError(f"bad report {bad!r}")
    for decoded in result.events:
        json.loads(decoded.open_json + b"}")
    silent = not result.events and not result.bad
    if silent and content_type in ("application/json", "") and json.loads(body) != []:
        raise AssertionError(f"neither decoded nor counted: {body!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
