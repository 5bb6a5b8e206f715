"""Report helpers: pure functions of the result rows."""

def test_choices_list_each_arms_own_candidates():
    from transferlab.core.report import choices_markdown

    rows = [{"arm": "a", "choices": {"setting": {"candidates": [1, 2], "chosen": 2}}},
            {"arm": "b", "choices": {"setting": {"candidates": [3, 4, 5], "chosen": 5}}},
            {"arm": "b", "choices": {"setting": {"candidates": [3, 4, 5], "chosen": 4}}}]
    text = choices_markdown(rows, ["a", "b"])
    assert "- `a` setting from [1, 2]: 2: 1" in text
    assert "- `b` setting from [3, 4, 5]: 4: 1, 5: 1" in text
