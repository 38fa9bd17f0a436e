import random

import torch

from vgen.text.negatives import OneWordNeighbours, swap_content_words


def test_swaps_two_content_words_and_keeps_the_bag_of_words():
    rng = random.Random(0)
    assert swap_content_words("a cat above a dog", rng) == "a dog above a cat"
    for caption in ["a cat to the left of a dog", "an apple below a car", "two fish"]:
        swapped = swap_content_words(caption, rng)
        assert swapped != caption and sorted(swapped.split()) == sorted(caption.split())


def test_no_negative_without_two_different_content_words():
    rng = random.Random(0)
    assert swap_content_words("a cat", rng) is None
    assert swap_content_words("red", rng) is None
    assert swap_content_words("a cat and a cat", rng) is None


def test_one_word_neighbours_differ_in_exactly_one_position():
    captions = ["a cat and a dog", "a cat and a fish", "a pig and a dog", "a dog and a cat",
                "a cat to the left of a dog", "a cat to the right of a dog", "two cats", "two dogs", "a cat"]
    neighbours = OneWordNeighbours(captions + ["a cat and a fish"])  # duplicates count once
    assert sorted(neighbours.of("a cat and a dog")) == ["a cat and a fish", "a pig and a dog"]  # not the reordering
    assert neighbours.of("a cat to the left of a dog") == ["a cat to the right of a dog"]
    assert neighbours.of("two cats") == ["two dogs"]
    assert neighbours.of("a cat") == []
    assert sorted(neighbours.of("a cow and a dog")) == ["a cat and a dog", "a pig and a dog"]  # not itself in the set
    rng = random.Random(0)
    assert {neighbours.choose("a cat and a dog", rng) for _ in range(50)} == {"a cat and a fish", "a pig and a dog"}
    assert neighbours.choose("a cat", rng) is None


def test_clip_loss_ranks_the_swapped_caption_as_a_negative(tmp_path):
    """With hard negatives the image->text softmax includes each image's swapped caption, so the
    loss is larger than without them whenever the swapped caption scores close to the true one."""
    from vgen.families.clip import ClipFamily
    from vgen.families.config import train_config_from_dict

    small = {"embed_dim": 16, "patch_size": 8, "vision_width": 16, "vision_layers": 1, "vision_head_width": 8,
             "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 12}
    losses = {}
    for hard in (False, True):
        cfg = train_config_from_dict({"kind": "clip", "clip": {**small, "hard_negatives": hard}})
        torch.manual_seed(0)
        task = ClipFamily(cfg, 16, torch.device("cpu"))
        captions = ["a cat above a dog", "a dog above a cat", "a fish", "a car below a bus"]
        batch = {"images": torch.randn(4, 3, 16, 16), "tokens": task.tokenizer(captions)}
        if hard:
            negatives = [swap_content_words(c, random.Random(i)) for i, c in enumerate(captions)]
            batch["negative_tokens"] = task.tokenizer([n or c for n, c in zip(negatives, captions)])
            batch["negative_valid"] = torch.tensor([n is not None for n in negatives])
        losses[hard] = task.loss(task.model, batch, 0)[0].item()
    assert losses[True] > losses[False]
