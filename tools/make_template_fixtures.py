#!/usr/bin/env python3
"""Makes tests/fixtures/templates/expected.json: chat-template renderings by transformers'
`apply_chat_template(..., tokenize=False)`, the reference that tests/templates.rs holds FineTune's
minijinja renderer to.

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install transformers jinja2   # no torch needed
    /tmp/tvenv/bin/python tools/make_template_fixtures.py

Every conversation below is rendered with every tokenizer folder in TEMPLATES, with
add_generation_prompt false and true. A rendering that raises (a template's `raise_exception`)
is recorded as {"error": message}; the Rust test expects an error containing that message.

The tokenizer folders: the four fixture models (tiny-llama and friends: ChatML; tiny-qwen2 keeps the
template inside tokenizer_config.json) and tests/fixtures/templates/<name>/, templates in the style
of well-known models (Qwen2.5 with tools, Llama 3.1 with bos_token / tools in the first user
message / raise_exception / tojson(indent=4), Qwen3 with pycompat string methods, namespace(),
reverse slicing and raise_exception), written after those models' templates but not byte-identical
copies of them, and templates/tojson-options, FineTune's own probe of tojson's keyword arguments
(sort_keys, ensure_ascii, indent, separators). All folders share the fixture byte-level BPE
tokenizer.json.
"""
import json
import platform
import sys
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures"
OUT = FIXTURES / "templates/expected.json"

# Folders relative to tests/fixtures.
TEMPLATES = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gpt2",
    "tiny-qwen3",
    "templates/qwen2.5-style",
    "templates/llama3.1-style",
    "templates/qwen3-style",
    "templates/tojson-options",
    "templates/mistral-style",
    "templates/gemma-style",
    "templates/phi3-style",
    "templates/smollm2-style",
]

# Keys deliberately not in sorted order: Python's json.dumps keeps insertion order, and so must
# FineTune's tojson.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Current weather 🌦 for a city, e.g. "Zürich".',
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in an IANA time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a concise assistant."}

CONVERSATIONS = {
    "system_user_assistant": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What is LoRA?"},
            {"role": "assistant", "content": "Low-rank adapters added to frozen weights."},
        ],
    },
    "user_assistant": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
    },
    "multi_turn": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another one, bigger?"},
            {"role": "assistant", "content": "11"},
        ],
    },
    "user_only": {
        "messages": [{"role": "user", "content": "Name three primes."}],
    },
    "open_multi_turn": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another one, bigger? «merci» 🤖"},
        ],
    },
    "open_no_system": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Count to three."},
        ],
    },
    "whitespace_unicode": {
        "messages": [
            {"role": "system", "content": "  Réponds en français.\n"},
            {"role": "user", "content": "  Qu'est-ce que « l'apprentissage » ? 🤖\n\n"},
            {"role": "assistant", "content": '\n C\'est apprendre — 学习, "tab"\there.  '},
        ],
    },
    "thinking": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
            {"role": "user", "content": "Times 3?"},
            {"role": "assistant", "content": "<think>\n\n4*3 = 12\n\n</think>\n\n12"},
        ],
    },
    "tools": {
        "tools": [WEATHER, TIME],
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("get_weather", {"city": "Zürich", "unit": "celsius"})],
            },
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear in Zürich."},
        ],
    },
    "tools_no_system": {
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Is it raining in Oslo?"}],
    },
    "parallel_tool_calls": {
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "user", "content": "Weather and time in Tokyo?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    call("get_weather", {"city": "Tokyo"}),
                    call("get_time", {"zone": "Asia/Tokyo"}),
                ],
            },
            {"role": "tool", "content": '{"temperature": 18}'},
            {"role": "tool", "content": '{"time": "09:30"}'},
            {"role": "assistant", "content": "18 degrees, 09:30."},
        ],
    },
    "no_user_query": {
        "messages": [SYSTEM, {"role": "assistant", "content": "Hello."}],
    },
    "tools_system_only": {
        "tools": [TIME],
        "messages": [SYSTEM],
    },
}


def render(tokenizer, conversation, add_generation_prompt):
    try:
        text = tokenizer.apply_chat_template(
            conversation["messages"],
            tools=conversation.get("tools"),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}
    assert isinstance(text, str), type(text)
    return {"text": text}


def main():
    renderings = []
    for folder in TEMPLATES:
        tokenizer = AutoTokenizer.from_pretrained(FIXTURES / folder)
        for name, conversation in CONVERSATIONS.items():
            for add_generation_prompt in (False, True):
                result = render(tokenizer, conversation, add_generation_prompt)
                renderings.append(
                    {
                        "template": folder,
                        "conversation": name,
                        "add_generation_prompt": add_generation_prompt,
                        **result,
                    }
                )
    expected = {
        "made_by": "python3 tools/make_template_fixtures.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "python": platform.python_version(),
        "call": "AutoTokenizer.from_pretrained(tests/fixtures/<template>).apply_chat_template("
        "messages, tools=tools, add_generation_prompt=..., tokenize=False)",
        "conversations": CONVERSATIONS,
        "renderings": renderings,
    }
    OUT.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    errors = sum("error" in r for r in renderings)
    print(f"{OUT}: {len(renderings)} renderings ({errors} errors)", file=sys.stderr)


if __name__ == "__main__":
    main()
