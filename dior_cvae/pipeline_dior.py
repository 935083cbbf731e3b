"""A "dialog-generation" pipeline, shipped with the model's remote code.

Every folder written by `DiorCVAEForConditionalGeneration.save_pretrained` holds this file and names it in
config.json's `custom_pipelines`, so

    from transformers import pipeline
    chat = pipeline("dialog-generation", model=path_or_repo, trust_remote_code=True)
    chat(["Hi , how are you ?", "Fine , thanks . And you ?"], num_return_sequences=3, max_new_tokens=40)
    # -> [{"generated_text": ...}, {"generated_text": ...}, {"generated_text": ...}]

works without the `dior_cvae` package; `pipeline("text-generation", ...)`, the Hub's snippet for the model card's
`pipeline_tag`, builds the same pipeline. Remote-code rules: this file imports nothing but transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline

TASK = "dialog-generation"
#: The Hub task of the model card (`pipeline_tag`). For it the Hub shows
#: `pipeline("text-generation", model=repo, trust_remote_code=True)`, so that name builds this pipeline too.
HUB_TASK = "text-generation"
_ENTRY = {"impl": "pipeline_dior.DialogGenerationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}
#: The `custom_pipelines` entries of config.json (the format `Pipeline.save_pretrained` writes): both names, one
#: pipeline. With two entries `pipeline(model=path)` cannot pick one: name the task.
CUSTOM_PIPELINES = {TASK: _ENTRY, HUB_TASK: _ENTRY}


#: chat roles that are dialog turns; the model conditions on the turns alone, so any other role is refused
DIALOG_ROLES = ("user", "assistant")


def tokenize_contexts(tokenizer, contexts: list[list[str]], separator: str) -> list[list[int]]:
    """Token ids (no <s> / </s> around) of each context, its turns joined by `separator`. User text is text: a
    special token typed in a turn ("</s>", "<pad>", ...) is tokenized as its characters, never as the token; only
    `separator` itself may be one (the tokenizer's eos token by default)."""
    if separator in tokenizer.all_special_tokens:  # each turn on its own, the separator's id between them
        separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
        flat = [turn for turns in contexts for turn in turns]
        ids = iter(tokenizer(flat, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
                   if flat else [])
        out = []
        for turns in contexts:
            joined: list[int] = []
            for index in range(len(turns)):
                joined += (separator_ids if index else []) + next(ids)
            out.append(joined)
        return out
    texts = [separator.join(turns) for turns in contexts]
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _turns(conversation: Any) -> list[str]:
    """One conversation -> its turns, oldest first: a string (one turn), a list of strings, or chat messages
    (`{"role", "content"}`; roles "user" and "assistant" are turns alike, any other role is refused)."""
    if isinstance(conversation, (str, dict)):
        conversation = [conversation]
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"a conversation is a string, a message or a non-empty list of turns, got {conversation!r}")
    turns = []
    for turn in conversation:
        if isinstance(turn, dict):
            role = turn.get("role", "user")
            if role not in DIALOG_ROLES:
                raise ValueError(f"a message with role {role!r}: Dior-CVAE conditions on dialog turns only (roles "
                                 f"{', '.join(DIALOG_ROLES)}, taken alike, in order); drop {role!r} messages (a "
                                 "system prompt has no effect on this model)")
            turn = turn.get("content")
        turns.append(turn)
    if not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"every turn must be a non-empty string (or a {{'role', 'content': str}} message), got {turns!r}")
    return [t.strip() for t in turns]


def _is_one_conversation(inputs: Any) -> bool:
    return isinstance(inputs, (str, dict)) or (isinstance(inputs, (list, tuple)) and all(
        isinstance(t, (str, dict)) for t in inputs))


class DialogGenerationPipeline(Pipeline):
    """Responses to dialog contexts; each returned response comes from its own draw of the latent prior.

    Inputs: one conversation (a string; a chat message `{"role", "content"}`; a list of turns oldest first, as
    strings or messages), or a list of conversations (a batch). Roles: "user" and "assistant" messages are turns
    alike (the model sees who spoke only by the order); any other role ("system", "tool") is refused. The turns
    are joined with `turn_separator` (default: the tokenizer's eos token, as in training); special tokens typed in
    a turn are text, not tokens. The context is truncated from the left (the latest turns kept) to
    `max_source_length` (default: the tokenizer's `model_max_length`).

    Every other keyword goes to `model.generate`: `num_return_sequences=k` gives k responses from k prior draws,
    plus `do_sample`, `top_p`, `num_beams`, `max_new_tokens`, `num_inference_steps`, `latent_generator`, ...

    Returns, per conversation, a list of `{"generated_text": str}` (a list of such lists for a batch).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, turn_separator=None, max_source_length=None, clean_up_tokenization_spaces=None,
                             **generate_kwargs):
        preprocess = {k: v for k, v in (("turn_separator", turn_separator), ("max_source_length", max_source_length))
                      if v is not None}
        postprocess = {} if clean_up_tokenization_spaces is None else {
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        return preprocess, generate_kwargs, postprocess

    def __call__(self, inputs, **kwargs):
        if _is_one_conversation(inputs):
            return super().__call__([_turns(inputs)], **kwargs)[0]
        return super().__call__([_turns(c) for c in inputs], **kwargs)

    def preprocess(self, conversation, turn_separator=None, max_source_length=None):
        import torch

        separator = self.tokenizer.eos_token if turn_separator is None else turn_separator
        body = tokenize_contexts(self.tokenizer, [conversation], separator)[0]
        limit = max_source_length or self.tokenizer.model_max_length
        body = body[-(limit - 2):] if len(body) > limit - 2 else body  # the latest turns
        ids = torch.tensor([[self.tokenizer.bos_token_id, *body, self.tokenizer.eos_token_id]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _forward(self, model_inputs, **generate_kwargs):
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(input_ids=model_inputs["input_ids"],
                                         attention_mask=model_inputs["attention_mask"], **generate_kwargs)
        return {"output_ids": output_ids.reshape(batch_size, -1, output_ids.shape[-1])}

    def postprocess(self, model_outputs, clean_up_tokenization_spaces=False):
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"][0], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        return [{"generated_text": text.strip()} for text in texts]
