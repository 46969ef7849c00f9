"""schemathesis hooks for tally (loaded by scripts/schemathesis.sh via SCHEMATHESIS_HOOKS).

POST /increments takes NDJSON: the OpenAPI document describes its body as an array of
increments, sent one JSON object per line. schemathesis has no NDJSON serializer of its own.
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    """An array becomes one JSON value per line; anything else (negative tests) one line."""
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    return json.dumps(value).encode()
