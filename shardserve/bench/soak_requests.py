"""The soak's request mix (`shardserve bench soak`): random completions and chats, streaming or not, of random
prompt and output lengths that fit the context, a share of them with a planned client disconnect."""
from __future__ import annotations

import argparse
import random
from typing import Any

from shardserve.bench.soak_report import RequestRecord
from shardserve.bench.workload import parse_range

# Prompt words: plain English, so that every tokenizer (the built-in model's, the tests' tiny one) takes each word as
# one or two tokens (the length limit below assumes at most TOKENS_PER_WORD).
WORDS = ("the a of and to in is it that was for on are with as his they be at one have this from or had by word but "
         "what some we can out other were all there when up use your how said an each she which do their time if will "
         "way about many then them write would like so these her long make thing see him two has look more day could "
         "go come did number sound no most people my over know water than call first who may down side been now find "
         "any new work part take get place made live where after back little only round man year came show every good "
         "me give our under name very through just form sentence great think say help low line differ turn cause much "
         "mean before move right boy old too same tell does set three want air well also play small end put home read "
         "hand port large spell add even land here must big high such follow act why ask men change went light kind "
         "off need house picture try us again animal point mother world near build self earth father head stand own "
         "page should country found answer school grow study still learn plant cover food sun four between state keep "
         "eye never last let thought city tree cross farm hard start might story saw far sea draw left late run while "
         "press close night real life few north open seem together next white children begin got walk example ease "
         "paper group always music those both mark often letter until mile river car feet care second book carry took "
         "science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood "
         "main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family "
         "direct pose leave song measure door product black short numeral class wind question happen complete ship "
         "area half rock order fire south problem piece told knew pass since top whole king space heard best hour "
         "better true during hundred five remember step early hold west ground interest reach fast verb sing listen "
         "six table travel less morning ten simple several vowel toward war lay against pattern slow center love "
         "person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly "
         "fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty "
         "drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special "
         "mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
         "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
         "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill "
         "east paint language among").split()
TOKENS_PER_WORD = 2
TEMPLATE_MARGIN_TOKENS = 48  # chat template and system message tokens on top of the prompt words


def make_request(rng: random.Random, args: argparse.Namespace, max_model_len: int) -> tuple[RequestRecord, dict]:
    """One random request of the mix: its record (plan) and JSON body (without "model")."""
    lo, hi = parse_range(args.max_tokens)
    max_tokens = rng.randint(lo, hi)
    wlo, whi = parse_range(args.prompt_words)
    room = (max_model_len - max_tokens - TEMPLATE_MARGIN_TOKENS) // TOKENS_PER_WORD
    if room < 1:
        max_tokens = max(1, max_model_len - TEMPLATE_MARGIN_TOKENS - TOKENS_PER_WORD)
        room = 1
    n_words = min(rng.randint(wlo, whi), room)
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    kind = rng.choice(("completion", "chat"))
    disconnect = rng.random() < args.disconnect_fraction
    rec = RequestRecord(kind=kind, stream=True, max_tokens=max_tokens)
    if disconnect and rng.random() < 0.8:   # mid-stream, after 0 (just the headers) .. max_tokens - 1 chunks
        rec.disconnect_after = rng.randint(0, max(0, max_tokens - 1))
    elif disconnect:                        # a non-streaming client that gives up while waiting
        rec.stream = False
        rec.disconnect_delay_s = rng.uniform(0.05, 1.5)
    else:
        rec.stream = rng.random() < 0.5
    # a planned disconnect ignores EOS, so that the stream is still going when the client leaves
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7, 1.0)),
                            "ignore_eos": disconnect or rng.random() < 0.5, "stream": rec.stream}
    if rec.stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if kind == "completion":
        body["prompt"] = text
        if rng.random() < 0.1:
            body["n"] = 2
    else:
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        body["messages"] = msgs + [{"role": "user", "content": text}]
    return rec, body
