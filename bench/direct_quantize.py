"""GPTQModel called directly, as a user's script would: load, quantize, save. Prints its metrics as JSON.

Uses the same calibration token ids as qrun (workers.calibration) so both quantize the same data.
"""

import json
import resource
import sys
import time
from pathlib import Path


def main(model_dir: str, calib: str, bits: int, group_size: int, out: str, samples: int, max_len: int,
         batch_size: int) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from qrun.workers.calibration import calibration_texts, tokenize_calibration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_calibration(calibration_texts(calib, samples)[0], tokenizer, max_len)
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, damp_percent=0.01)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = GPTQModel.load(model_dir, config, device=device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.quantize(rows, batch_size=batch_size, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save(out)
    save_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    losses = [float(r["loss"]) for r in getattr(model, "quant_log", []) or [] if "loss" in r]
    print(json.dumps({"load_s": load_s, "quantize_s": quantize_s, "save_s": save_s, "peak_gpu_mem_gb": peak, "process_peak_rss_gb": rss, "batch_size": batch_size,
                      "loss_mean": sum(losses) / len(losses) if losses else None,
                      "calib_tokens": sum(len(r["input_ids"]) for r in rows)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), a[4], int(a[5]), int(a[6]), int(a[7]) if len(a) > 7 else 1)
