"""A reward for pgpo train (reward.function=examples/own_task/my_reward.py:reward).

Called as reward(prompt, response, row) for every sampled response: prompt is the question's
user message, response the model's text, row the data row. Returns a score in [0, 1], or
(score, feedback): with teacher.feedback=include the feedback reaches the teacher's prompt.
"""

from pgpo.train.tasks import Numeric, parse_number


def reward(prompt: str, response: str, row: dict) -> tuple[float, str | None]:
    stated = Numeric().stated(response)  # the number in <answer>...</answer> or \boxed{}
    if stated is None:
        return 0.0, "Give one number inside <answer>...</answer>."
    gold = parse_number(str(row["answer"]))
    error = abs(parse_number(stated) - gold)
    if error == 0:
        return 1.0, None
    # Partial credit for a near miss, and feedback that says how far off it was.
    return max(0.0, 1.0 - float(error / max(abs(gold), 1))), f"{stated} is off by {error}."
