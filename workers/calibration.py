"""Calibration data for GPTQ: samples rendered the way the model saw its training data.

Calibration text formatted unlike the fine-tuning data lowers int4 accuracy, so chat-shaped
samples go through the tokenizer's chat template (with their answer) when it has one.
"""

from __future__ import annotations

from qrun.workers.datasets import Sample, load_samples

# Samples shorter than this many tokens are dropped, as GPTQModel drops them: with --calib-max-len
# below it no sample is left and every job fails (workers.inputs refuses it at submit).
MIN_CALIB_TOKENS = 10

# Used when a job names no calibration file: generic mixed Chinese/English prose and dialog.
# In-domain data (--calib, or the --eval file) is better; qrun logs a warning when it falls back.
BUILTIN_CALIBRATION = [
    "发言人1: 您好，这里是市公安局反诈中心，我们接到通知，您的银行卡涉嫌洗钱，需要配合调查。",
    "发言人2: 我怎么知道你是真的警察？我先挂了电话，打110核实一下。",
    "The quarterly report shows revenue up eight percent, driven by the new subscription plans in Asia.",
    "客服: 您好，您在我们平台购买的商品存在质量问题，我们将为您办理退款，请先添加这个微信。",
    "Alice: Could you send me the slides before the meeting? I want to check the numbers on page four.",
    "老师: 同学们，下周一期中考试，范围是第一到第五章，请大家认真复习。",
    "Bob: The weather in Hangzhou was lovely this weekend; we walked around West Lake for hours.",
    "发言人3: 那我们看一下上半年三四月份的数据，债务情况有没有一些缓解，还要继续观察。",
    "Caller: This is your bank. We noticed unusual activity; please read me the code we just texted you.",
    "妈妈: 晚上回来吃饭吗？我做了红烧肉，还买了你爱吃的草莓。",
    "Support: Your package could not be delivered. Click the link and pay a small redelivery fee.",
    "发言人1: 大家好，通过网络端接入的投资者可点击举手连麦等候提问，或在文字交流区提交您的问题。",
    "Researcher: We trained the model for three epochs and evaluated it on a held-out set of 2,349 dialogs.",
    "朋友: 我最近在一个投资群里，老师带着炒股，稳赚不赔，你要不要一起来？",
    "Manager: Let's move the release to Thursday so QA has two full days with the final build.",
    "医生: 这个药一天三次，饭后服用，一周后来复查。",
]


def render(sample: Sample, tokenizer) -> str:
    """The text of a sample as the model would see it during fine-tuning."""
    if sample.text is not None:
        return sample.text
    messages = list(sample.messages)
    if sample.answer is not None:
        messages.append({"role": "assistant", "content": sample.answer})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return "\n".join(m.get("content", "") for m in messages)


def calibration_texts(path: str | None, n_samples: int) -> tuple[list[Sample], bool]:
    """Up to n_samples samples from the file, or the built-in corpus; and whether it was the fallback."""
    if path:
        return load_samples(path)[:n_samples], False
    builtin = [Sample(id=str(i), messages=(), answer=None, label=None, text=t) for i, t in enumerate(BUILTIN_CALIBRATION)]
    return builtin[:n_samples], True


def tokenize_calibration(samples: list[Sample], tokenizer, max_len: int,
                         min_tokens: int = MIN_CALIB_TOKENS) -> list[dict]:
    """GPTQModel's calibration rows: input_ids and attention_mask, truncated to max_len tokens.

    Samples shorter than min_tokens are dropped (GPTQModel drops them too, silently).
    """
    rows = []
    for sample in samples:
        ids = tokenizer(render(sample, tokenizer), add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) >= min_tokens:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows
