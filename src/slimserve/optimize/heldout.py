"""Held-out English text for a language model's perplexity when the user gives none.

Written for this project (public domain), so no model was trained on it: everyday prose of
several kinds (narrative, instructions, explanation, dialogue), about 550 tokens with a
Llama-style tokenizer: long enough that one unlucky token does not move the perplexity much,
short enough to score in one forward pass in seconds on a CPU.
"""

from __future__ import annotations

HELD_OUT_TEXT = """\
The library on Harbour Street opened at nine, but Mrs. Okafor was always there by half past \
eight, sweeping the steps and checking the returns box for books that had spent the night \
in the rain. Most mornings the box held a few paperbacks, a cookbook with flour between its \
pages, and once, memorably, a live tortoise with a note asking whether anyone had reported \
it missing. Nobody had. The tortoise lived behind the front desk for three years and was \
better known in the town than the mayor.

To repot a houseplant, choose a pot only a little larger than the old one, with a hole in \
the bottom so that water can drain. Water the plant the day before, which makes the roots \
easier to loosen. Tip the plant out gently, tease apart any roots that circle the bottom, \
and set it at the same depth as before on a layer of fresh compost. Fill in around the \
sides, press the soil down lightly, and water it well. Keep it out of strong sun for a week \
while the roots settle.

A bicycle stays upright mostly because the rider keeps steering it underneath themselves. \
When the bicycle begins to lean to one side, the front wheel turns a little in the same \
direction, and the wheels move back under the centre of mass. The shape of the front fork \
helps this happen on its own at moderate speeds, which is why a bicycle pushed along an \
empty road can travel a surprising distance before it falls over.

"Are you sure this is the right train?" asked Daniel, looking at the board for the third \
time.
"It says Northfield," his sister replied. "We want Northfield."
"It also says it stops everywhere. We will be there by dinner, if we are lucky."
"Then we will have time to finish the crossword," she said, and handed him a pencil.

The committee met on the first Tuesday of every month to discuss the budget for the \
community garden. This year the largest costs were water, new fencing after the winter \
storms, and seeds for the school children's beds. The treasurer proposed a small fee for \
each plot, to be waived for anyone who volunteered four hours a season, and after a long \
discussion about fairness the proposal passed by seven votes to two.

When the first frost came, the garden went quiet. The bean poles leaned against each other \
like tired friends, the last tomatoes turned soft on the vine, and the robins moved in to \
look for worms in the freshly turned beds. By December only the leeks and the winter \
cabbages were left, standing in neat rows under a sky the colour of wet slate.
"""
