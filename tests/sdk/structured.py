"""The OpenAI Python SDK against Lookout's chat API with structured outputs.

    python structured.py BASE_URL

Prints one JSON line: what the SDK parsed. Exits non-zero (with the SDK's error) when anything
does not parse.
"""

import json
import sys
from typing import List, Literal

from openai import OpenAI
from pydantic import BaseModel, Field


class Vehicle(BaseModel):
    kind: Literal["car", "bus"]
    moving: bool


class Scene(BaseModel):
    person: bool
    count: int = Field(ge=0, le=9)
    weather: Literal["sunny", "rain", "snow"]
    vehicles: List[Vehicle] = Field(max_length=2)


def main():
    client = OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Describe the scene."}]
    out = {}
    # The SDK's own structured-output path: it sends a strict json_schema made from the
    # pydantic model and parses the answer into it.
    for seed in range(3):
        done = client.chat.completions.parse(
            model="lookout", messages=messages, response_format=Scene, max_tokens=120, temperature=1.0, seed=seed
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        scene = choice.message.parsed
        assert isinstance(scene, Scene), choice.message
        out.setdefault("parsed", []).append(scene.model_dump())
    # A hand-written response_format, streamed.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    text = ""
    for chunk in client.chat.completions.create(
        model="lookout", messages=messages, stream=True, max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema, "strict": True}},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    out["streamed"] = json.loads(text)
    # A schema that cannot compile is the SDK's BadRequestError (400).
    try:
        client.chat.completions.create(
            model="lookout", messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strnig"}}},
        )
        out["bad"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the class name is the assertion
        out["bad"] = type(e).__name__
        out["bad_status"] = getattr(e, "status_code", None)
        out["bad_message"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
