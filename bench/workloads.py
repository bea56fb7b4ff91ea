"""The benchmark's workloads: the fixed texts (a ~300-token system prompt, user questions, a
4-turn conversation) and the settings that size each workload (``BenchSettings``).

Every system receives the same token ids: prompts are rendered once with the model's own chat
template and tokenizer, so peers and the engine read exactly the same input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SYSTEM_PROMPT = (
    "You are the support assistant of Northwind Outfitters, a small company that sells hiking, "
    "camping and climbing gear online and in three shops. Answer customers politely, briefly and "
    "accurately. Follow these rules. First, orders: standard delivery takes three to five working "
    "days inside the country and costs 4.90 euros, free above 60 euros; express delivery takes one "
    "day and costs 12 euros. Orders placed before two in the afternoon leave the warehouse the same "
    "day. Second, returns: customers may return unused items within 30 days with the receipt; worn "
    "shoes and opened food cannot be returned; refunds reach the original payment method within ten "
    "days. Third, repairs: tents, backpacks and jackets bought from us are repaired free for two "
    "years; after that a repair costs a fixed 25 euros plus parts. Fourth, sizes: our boots run half "
    "a size small, our jackets run true to size, and climbing shoes should fit tightly. Fifth, "
    "safety: never give advice that could put someone in danger in the mountains; tell them to check "
    "the weather, carry water and a map, and tell someone their route. Sixth, shops: Lyon, Grenoble "
    "and Annecy, open Tuesday to Saturday from ten to seven. If you do not know an answer, say so and "
    "give the support e-mail help@northwind.example. Do not invent discounts. Keep answers under one "
    "hundred words unless the customer asks for detail."
)

QUESTIONS = [
    "I ordered a tent on Monday at noon. When will it arrive if I picked standard delivery?",
    "Can I return hiking boots that I wore once on a short walk around my house?",
    "My backpack strap broke after three years. How much will the repair cost me?",
    "What size of boots should I order if I normally wear a 42 in sneakers?",
    "Is the Grenoble shop open on Monday mornings, and what are its opening hours?",
    "How long does a refund take to reach my credit card after you receive my return?",
    "I want to climb Mont Blanc next week alone with no experience. Any tips?",
    "Does express delivery work on weekends, and how much does it cost in total?",
    "Can you give me a discount code for my first order with your company?",
    "My jacket zipper broke after one year of use. Will you repair it for free?",
    "Should climbing shoes be comfortable like sneakers or tight on my feet?",
    "I spent 55 euros. How much more should I buy to get free standard delivery?",
    "Can I return a bag of freeze-dried food that I opened but did not eat?",
    "Which of your shops is closest to Chambery, and when can I visit it?",
    "What should I carry for a day hike in the mountains in early spring?",
    "I ordered at four in the afternoon on Friday. When does the parcel leave?",
    "Do you repair tents that were bought in another shop, and at what price?",
    "How do I contact support if my question is not answered by the assistant?",
    "My son needs a rain jacket. Do your jackets run small or large in size?",
    "Can I exchange a sleeping bag for a bigger one within the first month?",
    "Is it safe to hike alone at night if I bring a good headlamp with me?",
    "What happens if my express parcel arrives two days late? Do I get money back?",
    "Do you sell gas cartridges for camping stoves in the Annecy shop?",
    "How long is the free repair period for a backpack bought from you?",
    "I lost my receipt. Can I still return an unused jacket I bought last week?",
    "Which payment methods do you accept for online orders and refunds?",
    "Can you recommend a tent for two people for summer camping in the Alps?",
    "Are your climbing harnesses safe to use for ice climbing in winter?",
    "Will my refund include the delivery cost if the item arrived broken?",
    "Is there a student discount if I show my card in one of your shops?",
    "My boots feel tight after one day. Is that normal for your brand of boots?",
    "What do I need to do before a multi-day hike to stay safe on the trail?",
]

CONVERSATION = [
    "Hello! I am planning a three-day hike in the Alps in June. What gear do I need?",
    "Thanks. Which of those items can I buy in your Annecy shop, and when is it open?",
    "If I order the tent online today instead, when will it arrive with express delivery?",
    "Great. And if the tent is damaged after one season, what will a repair cost me?",
]

SHORT_PROMPTS = [
    "Name a color.", "Say hello.", "Count to three.", "Name a fruit.", "Name an animal.",
    "Give a number.", "Name a city.", "Say goodbye.", "Name a tree.", "Name a river.",
]


@dataclass
class BenchSettings:
    """Sizes of every workload; ``quick()`` shrinks them for smoke runs."""

    w1_new_tokens: int = 128
    w2_requests: int = 16
    w2_new_tokens: int = 64
    sweep: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    w3_turns: int = 4
    w3_new_tokens: int = 64
    ttft_repeats: int = 5
    rss_requests: int = 500
    rss_new_tokens: int = 8
    rss_wave: int = 16  # short requests submitted together
    stagger_ms: float = 100.0  # engine-only W2 variant with staggered arrivals
    # peers that serve one request at a time are measured on at most this many requests per
    # sweep point (and within peer_time_budget_s); the rest of the queue is extrapolated
    peer_max_requests: int = 16
    peer_time_budget_s: float = 90.0
    threads: int = 0  # torch threads; 0 = one per core
    warmup: bool = True
    # workloads outside the default set (bench.versus, issue 14): W1 repeated (medians), a long prefill
    decode_repeats: int = 3  # ``decode``: W1 this many times; decode tokens/s = (n-1) / (last - first token)
    prefill_tokens: int = 1000  # ``prefill``: a prompt of exactly this many tokens, 1 new token
    prefill_repeats: int = 3

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(w1_new_tokens=32, w2_requests=4, w2_new_tokens=16, sweep=[1, 4], w3_turns=2, w3_new_tokens=16,
                   ttft_repeats=2, rss_requests=48, rss_new_tokens=4, peer_max_requests=4, peer_time_budget_s=30.0,
                   decode_repeats=1, prefill_tokens=200, prefill_repeats=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the rendered chat prompt (with the generation prompt), as every system sees it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def w2_messages(i: int) -> list[dict]:
    """The i-th concurrent chat: the shared system prompt and a distinct user question."""
    question = f"{QUESTIONS[i % len(QUESTIONS)]} My customer number is NW-{10007 + 137 * i}, thanks a lot."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def w2_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` prompts sharing the system prompt; the customer number keeps each one distinct."""
    out = []
    for i in range(n):
        msgs = w2_messages(i)
        out.append(chat_ids(tokenizer, msgs))
    return out


def w1_prompt(tokenizer: Any) -> list[int]:
    return chat_ids(tokenizer, [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}])


def rss_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """Short distinct prompts (the index makes each one unique) for the memory-flatness run."""
    return [chat_ids(tokenizer, [{"role": "user", "content": f"{SHORT_PROMPTS[i % len(SHORT_PROMPTS)]} (#{i})"}]) for i in range(n)]


def long_prompt(tokenizer: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids: a chat whose user turn carries the support rules and every question
    (repeated as needed), cut to ``n`` tokens; for prefill throughput (its end is not a turn end)."""
    parts = [SYSTEM_PROMPT, *QUESTIONS]
    content: list[str] = []
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        content.append(parts[i % len(parts)])
        i += 1
        ids = chat_ids(tokenizer, [{"role": "user", "content": " ".join(content)}])
    return ids[:n]

