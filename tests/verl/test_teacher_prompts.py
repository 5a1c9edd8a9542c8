"""Teacher-side prompts (``ta_opd.teacher_prompt``, `ta_opd_verl.teacher_prompts`) without verl's trainer: the
row alignment against a loop written from its definition, the rendering with the teacher's own template,
the server teacher's request and rows, the colocated teacher's driver stage, and every refused
configuration (before start-up, naming the key or the file)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from verl_fixtures import InMemoryTransferQueue, compose_config, nested

from ta_opd_verl.checks import TAOPDConfigError, check_model_paths, check_ta_opd_config
from ta_opd_verl.protocol import TEACHER_PROMPT_IDS_FIELD
from ta_opd_verl.teacher_prompts import TeacherPromptError, TeacherPrompts, chat_messages, teacher_positions
from ta_opd_verl.teachers.server import ServerTeacherRequests

KEY = "distillation.distillation_loss.ta_opd"
TEACHER_MODEL_ELSEWHERE = "distillation.teacher_models.teacher_model.model_path=/nonexistent"
MESSAGES = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "seven plus eight"}]


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair(quiet=True)


@given(student_prompt=st.integers(1, 12), teacher_prompt=st.integers(1, 12), response=st.integers(0, 12))
def test_teacher_positions_line_up_every_row_that_predicts_a_response_token(
    student_prompt, teacher_prompt, response
):
    positions = teacher_positions(student_prompt, teacher_prompt, response).tolist()
    assert len(positions) == student_prompt + response
    # Row t describes token t + 1: from the last prompt token on, both rows describe the same response token.
    for j in range(response + 1):
        assert positions[student_prompt - 1 + j] == teacher_prompt - 1 + j
    # The rows nothing reads are still rows of the teacher's sequence.
    assert all(0 <= p < teacher_prompt + response for p in positions)


def test_a_prompt_without_tokens_is_refused():
    with pytest.raises(ValueError, match="both prompts need a token"):
        teacher_positions(0, 3, 2)


@pytest.mark.parametrize("value", [[], "a string", [{"role": "user"}], None])
def test_a_field_without_chat_messages_is_refused_naming_it(value):
    with pytest.raises(TeacherPromptError, match=r"field 'hint' holds .*non-empty list of chat messages"):
        chat_messages(value, "hint")


def _prompts(pair, mode: str, *extra: str) -> TeacherPrompts:
    return TeacherPrompts.from_config(compose_config("ta_opd_cpu", [f"{KEY}.teacher_prompt={mode}", *extra]))


def test_the_student_prompt_is_the_default_and_builds_nothing():
    assert TeacherPrompts.from_config(compose_config("ta_opd_cpu")) is None


def test_a_column_prompt_is_the_columns_messages_in_the_teachers_template(pair):
    from transformers import AutoTokenizer

    prompts = _prompts(pair, "column", f"{KEY}.teacher_prompt_column=hint")
    sample = {"hint": MESSAGES, "raw_prompt": MESSAGES[1:]}
    expected = AutoTokenizer.from_pretrained(pair.teacher).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    ids = prompts.prompt_ids(str(pair.teacher), prompts.messages(sample))
    assert AutoTokenizer.from_pretrained(pair.teacher).decode(ids) == expected
    assert _prompts(pair, "teacher_template").messages(sample) == MESSAGES[1:]
    with pytest.raises(TeacherPromptError, match=r"teacher_prompt=column: the sample has no field 'hint'"):
        prompts.messages({"raw_prompt": MESSAGES})


def test_a_server_teachers_prompt_is_rendered_and_its_rows_come_back_lined_up(pair):
    """The server teacher's request: the teacher's own prompt then the student's response; its rows (one per
    teacher token, here each row holding its own position) come back as rows of the student's sequence, the
    sampled column holding the student's next token."""
    prompts = _prompts(pair, "column", f"{KEY}.teacher_prompt_column=hint")
    requests = ServerTeacherRequests(str(pair.teacher), None, prompts)
    student_prompt, response = [1, 40, 41, 2, 1, 42], [50, 51, 2]
    teacher_prompt, teacher_response = requests.teacher_sequence(student_prompt, response, {"hint": MESSAGES})
    assert teacher_prompt == prompts.prompt_ids(str(pair.teacher), MESSAGES) and teacher_response == response
    assert len(teacher_prompt) > len(student_prompt)
    length = len(teacher_prompt) + len(response)
    rows = (
        torch.arange(length, dtype=torch.int32)[:, None].repeat(1, 3),
        -torch.arange(length).float()[:, None],
    )
    ids, logprobs = requests.student_rows(
        (rows[0], rows[1].repeat(1, 3)), student_prompt, response, len(teacher_prompt)
    )
    assert ids.shape == (len(student_prompt) + len(response), 3)
    for j in range(len(response) + 1):
        assert ids[len(student_prompt) - 1 + j, 0] == len(teacher_prompt) - 1 + j
        assert logprobs[len(student_prompt) - 1 + j, 0] == -(len(teacher_prompt) - 1 + j)
    assert ids[:-1, -1].tolist() == (student_prompt + response)[1:]


def test_the_colocated_teacher_stores_each_samples_teacher_prompt_before_scoring(pair, monkeypatch):
    from transfer_queue import KVBatchMeta

    from ta_opd_verl.teachers.colocated import ColocatedFSDPTeacher

    config = compose_config(
        "ta_opd_cpu",
        [
            f"{KEY}.teacher=fsdp",
            f"{KEY}.teacher_path={pair.teacher}",
            f"{KEY}.teacher_prompt=teacher_template",
            "distillation.teacher_models.teacher_model.model_path=/nonexistent",
        ],
    )
    teacher = ColocatedFSDPTeacher.from_config(config)
    teacher.use_teacher_prompts(TeacherPrompts.from_config(config))
    conversations = [MESSAGES, MESSAGES[1:]]
    queue = InMemoryTransferQueue({"raw_prompt": conversations, "prompts": nested([torch.ones(3)] * 2)})
    queue.install(monkeypatch)
    batch = KVBatchMeta(keys=["a", "b"], tags=[{}, {}], partition_id="train", fields=["raw_prompt"])
    batch = teacher.before_scoring(batch)
    assert TEACHER_PROMPT_IDS_FIELD in batch.fields
    stored = [row.tolist() for row in queue.fields[TEACHER_PROMPT_IDS_FIELD].unbind()]
    assert stored == [teacher.teacher_prompts.prompt_ids(str(pair.teacher), m) for m in conversations]
    assert teacher.teacher_prompt_lengths(batch).tolist() == [len(ids) for ids in stored]


# ---- refusals ------------------------------------------------------------------------------------------


def _paths_config(pair, train_file, *overrides: str):
    return compose_config(
        "ta_opd_cpu",
        [
            f"actor_rollout_ref.model.path={pair.student}",
            f"distillation.teacher_models.teacher_model.model_path={pair.teacher}",
            f"data.train_files={train_file}",
            *overrides,
        ],
    )


def test_an_unknown_teacher_prompt_is_refused_naming_the_key():
    config = compose_config(
        "ta_opd_cpu",
        [f"{KEY}.teacher_prompt=hint", "distillation.teacher_models.teacher_model.model_path=/x"],
    )
    with pytest.raises(
        TAOPDConfigError,
        match=rf"{KEY}\.teacher_prompt must be one of \[.*\], got 'hint'",
    ):
        check_ta_opd_config(config)


def test_a_training_file_without_the_column_is_refused_naming_file_column_and_key(pair):
    config = _paths_config(pair, pair.train_parquet, f"{KEY}.teacher_prompt=column")
    with pytest.raises(
        TAOPDConfigError,
        match=rf"^data\.train_files: .*train\.parquet has no column 'teacher_prompt' \({KEY}\.teacher_prompt_"
        r"column\).*ta-opd prepare-data --teacher-prompt",
    ):
        check_model_paths(config)


def test_a_row_without_chat_messages_in_the_column_is_refused_naming_file_and_row(pair, tmp_path):
    frame = pd.read_parquet(pair.train_parquet).head(3)
    frame["hint"] = [MESSAGES, MESSAGES, []]
    frame.to_parquet(tmp_path / "train.parquet")
    config = _paths_config(
        pair, tmp_path / "train.parquet", f"{KEY}.teacher_prompt=column", f"{KEY}.teacher_prompt_column=hint"
    )
    with pytest.raises(TAOPDConfigError, match=r"train\.parquet, row 2: field 'hint' holds"):
        check_model_paths(config)
    frame["hint"] = [MESSAGES] * 3
    frame.to_parquet(tmp_path / "train.parquet")
    check_model_paths(config)


def test_a_teacher_without_a_chat_template_is_refused_for_its_own_template(pair, tmp_path):
    import json
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(pair.teacher, teacher)
    tokenizer_config = json.loads((teacher / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    config = _paths_config(
        pair,
        pair.train_parquet,
        f"distillation.teacher_models.teacher_model.model_path={teacher}",
        f"{KEY}.teacher_prompt=teacher_template",
    )
    with pytest.raises(
        TAOPDConfigError, match=r"teacher_prompt=teacher_template: the teacher .* no chat template"
    ):
        check_model_paths(config)
    check_model_paths(_paths_config(pair, pair.train_parquet, f"{KEY}.teacher_prompt=teacher_template"))


def test_a_users_own_agent_loop_manager_is_refused_where_the_teacher_needs_ours(pair):
    manager = "actor_rollout_ref.rollout.agent.agent_loop_manager_class"
    config = _paths_config(
        pair, pair.train_parquet, f"{KEY}.teacher_prompt=teacher_template", f"+{manager}=my.Manager"
    )
    with pytest.raises(TAOPDConfigError, match=rf"^{manager}='my\.Manager': .*accepted: null"):
        check_model_paths(config)
    # With the student's prompt and no map the teacher is sent verl's own request: the user's manager stays.
    check_model_paths(_paths_config(pair, pair.train_parquet, f"+{manager}=my.Manager"))


def test_teacher_prompts_longer_than_the_teachers_context_are_refused_naming_its_key(pair):
    inference_key = "distillation.teacher_models.teacher_model.inference.max_model_len"
    config = _paths_config(
        pair, pair.train_parquet, f"{KEY}.teacher_prompt=teacher_template", f"{inference_key}=48"
    )
    with pytest.raises(
        TAOPDConfigError,
        match=rf"longest teacher prompt .* needs \d+ > {inference_key}=48; accepted: shorter",
    ):
        check_model_paths(config)
    # The tiny teacher's own context (256 positions) holds them.
    check_model_paths(_paths_config(pair, pair.train_parquet, f"{KEY}.teacher_prompt=teacher_template"))


def test_an_empty_teacher_prompt_column_name_is_refused_naming_the_key():
    config = compose_config(
        "ta_opd_cpu",
        [f"{KEY}.teacher_prompt=column", f"{KEY}.teacher_prompt_column=''", TEACHER_MODEL_ELSEWHERE],
    )
    with pytest.raises(
        TAOPDConfigError, match=rf"{KEY}\.teacher_prompt_column must be a parquet column name"
    ):
        check_ta_opd_config(config)


def test_our_agent_loop_manager_named_by_hand_without_the_trainer_fails_loudly(monkeypatch):
    """The manager verl loads by name serves the requests TA-OPD's trainer registered in the driver: named
    in a config by hand, with none registered, it stops at once instead of sending verl's requests."""
    from verl.utils.import_utils import load_class_from_fqn

    from ta_opd_verl.verl_fence import agent_loop

    monkeypatch.setattr(agent_loop, "_REQUESTS", {})
    manager = load_class_from_fqn(agent_loop.AGENT_LOOP_MANAGER, "AgentLoopManager")
    with pytest.raises(RuntimeError, match=r"is set by TA-OPD's trainer .* cannot be used on its own"):
        manager(config=compose_config("ta_opd_cpu", [TEACHER_MODEL_ELSEWHERE]), llm_client=None)
    monkeypatch.setattr(agent_loop, "_REQUESTS", {"/teacher": object()})
    workers = manager(config=compose_config("ta_opd_cpu", [TEACHER_MODEL_ELSEWHERE]), llm_client=None)
    assert workers.agent_loop_workers_class.__ray_actor_class__.__name__ == "TeacherRequestsAgentLoopWorker"
