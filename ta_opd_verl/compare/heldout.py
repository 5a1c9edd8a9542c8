"""The held-out reverse KL of `ta-opd compare`: how close a student is to the teacher on a fixed set."""

from __future__ import annotations

from pathlib import Path

import torch

from ta_opd_verl.diagnose.bank import (
    BANK_FORMAT,
    Bank,
    BankError,
    load_bank,
    prompt_token_ids,
    read_prompts,
    save_bank,
)
from ta_opd_verl.diagnose.models import config_vocab_size, load_model
from ta_opd_verl.diagnose.passes import PassSettings, score_trained

HELDOUT_PROMPTS = 64
# conf/cpu_runtime.yaml's data.max_response_length: the held-out answers are as long as a rollout can be.
HELDOUT_RESPONSE_TOKENS = 32
HELDOUT_FILE = "heldout.parquet"


class HeldoutReverseKL:
    """Full-vocabulary reverse KL(p_student || p_teacher), averaged over every response position of a fixed
    set: the teacher's greedy answers to the first `HELDOUT_PROMPTS` validation prompts, built once and
    cached as a diagnostic bank (``heldout.parquet``, rebuilt when the pair or its paths change)."""

    def __init__(self, pair, path: Path) -> None:
        # transformers takes seconds to import; only a comparison that measures needs it, not --dry-run.
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(pair.teacher)
        self.pad_id = self.tokenizer.pad_token_id
        self.vocab_size = config_vocab_size(pair.teacher, "teacher")
        self.teacher = load_model(pair.teacher, "cpu", torch.float32, "teacher")
        wanted = {
            "teacher": str(pair.teacher),
            "pair_settings_hash": pair.manifest.get("settings_hash"),
            "data": str(pair.val_parquet),
            "prompts": HELDOUT_PROMPTS,
        }
        try:
            bank = load_bank(path) if path.is_file() else None
        except BankError:
            bank = None
        if bank is None or {key: bank.settings.get(key) for key in wanted} != wanted:
            bank = self._greedy_bank(pair.val_parquet, wanted)
            save_bank(bank, path)
        self.bank = bank

    def _greedy_bank(self, val_parquet: Path, settings: dict) -> Bank:
        prompts = read_prompts(val_parquet, HELDOUT_PROMPTS)
        encoded = [prompt_token_ids(self.tokenizer, messages) for _, messages in prompts]
        width = max(map(len, encoded))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        eos_id = self.tokenizer.eos_token_id
        with torch.no_grad():
            generated = self.teacher.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=HELDOUT_RESPONSE_TOKENS,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=self.pad_id,
            )
        responses = []
        for row in generated[:, width:].tolist():
            # Up to and including EOS, as verl's response mask counts it.
            end = row.index(eos_id) + 1 if eos_id in row else len(row)
            responses.append(tuple(row[:end]))
        return Bank(
            prompt_index=tuple(index for index, _ in prompts),
            sample=(0,) * len(prompts),
            prompts=tuple(tuple(messages) for _, messages in prompts),
            prompt_ids=tuple(tuple(ids) for ids in encoded),
            response_ids=tuple(responses),
            settings={**settings, "format": BANK_FORMAT},
        )

    def measure(self, student_path: Path | str) -> float:
        """The student's mean reverse KL over the set's response positions (the diagnostic's full-vocabulary
        `divergences`, one forward of the whole set)."""
        student = load_model(student_path, "cpu", torch.float32, "student")
        passes = PassSettings(
            batch_size=self.bank.rollouts,
            vocab_size=self.vocab_size,
            pad_id=self.pad_id,
            device="cpu",
            dtype=torch.float32,
            quiet=True,
        )
        reverse_kl = score_trained(student, self.teacher, self.bank, passes, "held-out")["reverse_kl"]
        return float(reverse_kl[self.bank.valid_mask()].mean())
