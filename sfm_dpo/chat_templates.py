"""Chat templates for the two SFM model families.

The tokenizer's own template always wins; these are what `--chat_template sfm|chatml` installs when a tokenizer has
none (the tiny demo tokenizer ships with SFM_TEMPLATE).
"""

# SFM GPT-NeoX format (geodesic-research SFT models): bos first; `<|role|>\n` + content per message; user/system
# messages end with "\n"; an assistant message ends with eos, plus "\n" when it is not the last message.
# Generation prompt: `<|assistant|>\n` (no `<think>`: the Think data carries it inside the assistant content).
SFM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# OLMo 3 ChatML format: `<|im_start|>role\n...<|im_end|>\n`; the last assistant turn also ends with eos.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if loop.last and message['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"sfm": SFM_TEMPLATE, "chatml": CHATML_TEMPLATE}


def resolve_chat_template(tokenizer, chat_template: str | None, log) -> None:
    """Installs `chat_template` ("sfm", "chatml" or a Jinja string) on `tokenizer` when asked; otherwise keeps the
    tokenizer's own, and fails with the option's name when there is none."""
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        log.info(
            "Using chat template %r from --chat_template.",
            chat_template if chat_template in CHAT_TEMPLATES else "custom",
        )
    elif not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no chat template. Pass --chat_template sfm (SFM GPT-NeoX "
            "format), --chat_template chatml (OLMo 3 format) or a Jinja template string."
        )
