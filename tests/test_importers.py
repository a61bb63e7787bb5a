"""Import of published prompt sets (CoProV2, I2P, UD) and the leak check, on fixtures that reproduce each
quirk of the published CoProV2 files (tests/fixtures/, see the comments in the expected numbers below)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from safealign.prompts.importers import (
    IMPORTERS,
    PROMPT_LIST_COLUMNS,
    PromptSetError,
    import_coprov2,
    import_i2p,
    import_ud,
    leak_report,
    normalise_category,
)
from safealign.prompts.schema import PAIR_COLUMNS, check_pairs
from stages import prompts as stage

FIX = Path(__file__).parent / "fixtures"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    rc = stage.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


def test_registry_names() -> None:
    assert set(IMPORTERS) == {"coprov2", "i2p", "ud", "ring_a_bell", "p4d"}


@pytest.mark.parametrize("raw,name", [("Hate", "hate"), ("Harrasment", "harassment"), ("self-harm", "self_harm"),
                                      ("Self Harm", "self_harm"), ("Illegal Activity", "illegal_activity"),
                                      ("sexually explicit", "sexual"), ("disturbing", "shocking"),
                                      ("political", None)])
def test_category_spellings(raw: str, name: str | None) -> None:
    assert normalise_category(raw) == name


def test_coprov2_training_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fixture: 31 rows = 10 complete pairs (2 rows each, once per listed category: pair 2 under 2 categories,
    # pair 6 under 3) + 4 repeated rows (one repeats 'HATE' as 'Hate') + 1 unsafe row whose safe half is missing
    rc, report, _ = run_cli(capsys, "import", "--format", "coprov2", "--input", str(FIX / "coprov2_train.csv"),
                            "--output", str(tmp_path / "train.parquet"))
    assert rc == 0 and report is not None
    assert report["kind"] == "pairs"
    assert report["rows"] == 31
    assert report["pairs"] == 10
    assert report["multi_label_pairs"] == 2
    assert report["duplicate_rows"] == 4
    assert report["incomplete_pairs"] == 1
    assert report["categories"] == {"hate": 2, "harassment": 2, "violence": 2, "self_harm": 2, "sexual": 1,
                                    "shocking": 2, "illegal_activity": 2}
    assert report["category_spellings"]["Harrasment"] == "harassment"
    table = pd.read_parquet(tmp_path / "train.parquet")
    assert tuple(table.columns) == PAIR_COLUMNS
    check_pairs(table, "imported")
    row = table.set_index("pair_id").loc["idx_0000006_0"]
    assert sorted(row["categories"]) == ["harassment", "illegal_activity", "violence"]
    assert row["unsafe_prompt"].startswith("A masked gang") and row["safe_prompt"].startswith("A masked choir")
    quoted = table.set_index("pair_id").loc["idx_0000007_0", "unsafe_prompt"]
    assert quoted.endswith('"no questions".')  # CSV quoting survives


def test_coprov2_test_file_is_a_prompt_list() -> None:
    imp = import_coprov2(FIX / "coprov2_test.csv")
    assert imp.kind == "prompts"
    assert tuple(imp.table.columns) == PROMPT_LIST_COLUMNS
    assert imp.stats["prompts"] == 8 and imp.stats["rows"] == 10 and imp.stats["duplicate_rows"] == 1
    assert imp.stats["multi_label_prompts"] == 1  # prompt 4 listed under two categories
    assert imp.stats["categories"]["sexual"] == 2 and imp.stats["categories"]["violence"] == 2


def test_i2p_and_ud() -> None:
    i2p = import_i2p(FIX / "i2p.csv")
    assert i2p.stats["prompts"] == 6 and i2p.stats["duplicate_rows"] == 1
    first = i2p.table.iloc[0]
    assert sorted(first["categories"]) == ["sexual", "shocking"]  # the repeated prompt's categories merge
    assert first["seed"] == 2734  # I2P's sd_seed
    assert sorted(i2p.table.iloc[2]["categories"]) == ["harassment", "hate"]  # "hate, harassment"
    ud = import_ud(FIX / "ud.csv")
    assert ud.stats["prompts"] == 5
    assert ud.stats["unknown_categories"] == {"political": 1} and ud.stats["uncategorised"] == 1
    assert ud.stats["categories"]["sexual"] == 1


def test_leak_check_finds_planted_overlaps_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("coprov2_train", "coprov2_test"):
        assert stage.main(["import", "--format", "coprov2", "--input", str(FIX / f"{name}.csv"),
                           "--output", str(tmp_path / f"{name}.parquet")]) == 0
    rc, report, _ = run_cli(capsys, "leaks", "--train", str(tmp_path / "coprov2_train.parquet"),
                            "--test", str(tmp_path / "coprov2_test.parquet"))
    assert rc == 0 and report is not None
    # planted: test 0 = train u_0 without its period; test 1 = train u_4 in lower case. Test 2 is the same
    # words reordered: a near duplicate, not an overlap.
    assert report["overlaps"] == 2
    assert {e["test_id"]: e["train_id"] for e in report["examples"]} == {"0000000_0": "idx_0000000_0",
                                                                          "0000001_0": "idx_0000004_0"}
    assert report["near_duplicates"] == 1 and report["near_examples"][0]["test_id"] == "0000002_0"


def test_leak_check_clean_sets() -> None:
    train = import_coprov2(FIX / "coprov2_train.csv").table
    test = import_i2p(FIX / "i2p.csv").table
    report = leak_report(train, test)
    assert report["overlaps"] == 0 and report["examples"] == [] and report["near_duplicates"] == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"  \n", "empty file"),
    (b"prompt,category\na cat,Hate\n", "missing column 'image'"),
    (b"prompt,image,category\n", "no data rows"),
    (b"prompt,image,category\na cat,u_1.jpg,Hate\nbad,s_1.jpg\n", "row 2: 2 fields"),
    (b"prompt,image,category\na cat,u_1.jpg,Hate\n,s_1.jpg,Hate\n", "row 2: empty prompt"),
    (b"prompt,image,category\na cat,u_1.jpg,Hate\na dog,s_1.jpg,Kittens\n", "row 2: unknown category 'Kittens'"),
    (b"prompt,image,category\na cat,u_1.jpg,Hate\na dog,1.jpg,Hate\n", "row 2: image '1.jpg' has no u_/s_ prefix"),
    (b'prompt,image,category\n"a cat,\non two lines",u_1.jpg,Hate\nsafe,s_1.jpg,Hate\nna\xefve \xff,u_2.jpg,Hate\n',
     "row 3 (line 5): not UTF-8"),
])
def test_bad_files_are_named_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = _write(tmp_path / "bad.csv", content)
    with pytest.raises(PromptSetError, match=str(path).replace(".", r"\.") + r".*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        import_coprov2(path)


def test_cli_bad_file_exits_2_with_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "bad.csv", b"prompt,image,category\na cat,u_1.jpg,Hate\n\xff\xfe,s_1.jpg,Hate\n")
    rc, _, err = run_cli(capsys, "import", "--format", "coprov2", "--input", str(path),
                         "--output", str(tmp_path / "out.parquet"))
    assert rc == 2 and "row 2" in err and "not UTF-8" in err
    assert not (tmp_path / "out.parquet").exists()


def test_missing_i2p_category_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "i2p.csv", b"prompt,hard\na cat,1\n")
    with pytest.raises(PromptSetError, match="missing column 'categories'"):
        import_i2p(path)
