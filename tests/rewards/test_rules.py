from rlhf.rewards.rules import first_number_matches


def test_first_number_matches_strings_and_messages():
    comps = ["8", "The answer is 8.", "3 + 5 = 8", [{"role": "assistant", "content": "8 apples"}], "no number", "-2"]
    assert first_number_matches(comps, answer=[8, 8, 8, 8, 8, -2]) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
