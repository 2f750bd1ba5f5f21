"""The ``contrast`` rule: two prompts that differ by an opposite, or by one swapped word.

Prompts that differ in one word score a high cosine similarity whatever the word is, and
the longer the prompts the higher it is: "How do I enable two-factor login on the admin
console for every user of our team?" and the same with "disable" sit at about 0.97. The
``numbers``, ``negation`` and ``entities`` rules do not see such a change; this rule does.
Two prompts disagree when, after removing the words they share (counted, casefolded,
with a plural, past or -ing ending taken off):

- a word left in one and a word left in the other are **opposites**: a pair of the
  lexicon below (enable/disable, upload/download, before/after, cheap/expensive,
  maximum/minimum, ...), two quantifiers (all/any/only/most), or one is the other with a
  prefix that reverses or repeats it (install/uninstall, encrypt/decrypt, valid/invalid,
  install/reinstall, compress/decompress); or
- two blocks of the same words **trade places** around the same words ("merge main into my
  branch" / "merge my branch into main"; not "X and Y", nor a clause moved whole); or
- exactly **one content word** is left on each side (function words aside), and the two
  are not forms of one word ("differ" / "difference"): "reset my password" / "reset my
  PIN", "nightly builds" / "weekly builds". A rewrite that means
  the same changes more than one word; a prompt edited in one word is the signature of a
  different question, and a miss costs less than a wrong answer.

Linear in the texts (two counters), but for the pairwise search of what is left over (at
most :data:`MAX_LEFT` words a side) and the search for trading blocks (at most
:data:`MAX_SWAP` words after the shared start and end). Pure functions; :mod:`.rules`
registers :func:`contrast_agrees` as a check.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

_PAIRS: Final = """
enable disable  enabled disabled  turn_on turn_off  start stop  open close  opened closed
upload download  import export  input output  inbound outbound  incoming outgoing
buy sell  purchase sell  buyer seller  lend borrow  lender borrower  give take
send receive  sender recipient  push pull  add remove  insert delete  create delete
increase decrease  increase reduce  raise lower  grow shrink  expand collapse
gain lose  win lose  profit loss  credit debit  deposit withdraw  income expense
before after  earlier later  early late  first last  begin end  beginning end
past future  previous next  old new  older newer  oldest newest  ancient modern
maximum minimum  max min  most least  more less  more fewer  many few  all none
all some  some none  every no  always never  always sometimes  often rarely
cheap expensive  cheaper costlier  cheapest priciest  free paid  high low
higher lower  highest lowest  big small  bigger smaller  biggest smallest
large small  larger smaller  largest smallest  long short  longer shorter
longest shortest  fast slow  faster slower  fastest slowest  quick slow
good bad  better worse  best worst  strong weak  stronger weaker  safe dangerous
safer riskier  easy hard  easier harder  easy difficult  simple complex
light heavy  lighter heavier  hot cold  warm cool  warmer cooler  hotter colder
wet dry  full empty  heavy light  thick thin  wide narrow  deep shallow
up down  upper lower  above below  over under  top bottom  inside outside
internal external  front back  left right  north south  east west
upstream downstream  upgrade downgrade  upscale downscale  uphill downhill
login logout  log_in log_out  signin signout  sign_in sign_out
accept reject  approve reject  approve deny  allow deny  allow block  permit forbid
include exclude  included excluded  inclusive exclusive  attach detach
connect disconnect  mount unmount  lock unlock  encrypt decrypt  encode decode
compress decompress  serialize deserialize  subscribe unsubscribe  follow unfollow
install uninstall  activate deactivate  register deregister  link unlink
public private  true false  success failure  pass fail  valid invalid
legal illegal  possible impossible  visible hidden  show hide  online offline
local remote  client server  sync async  synchronous asynchronous  static dynamic
mutable immutable  ascending descending  asc desc  horizontal vertical
positive negative  plus minus  add subtract  multiply divide  sum difference
odd even  male female  men women  man woman  boy girl  husband wife
adult child  adults children  parent child  parents children  teacher student
employer employee  landlord tenant  buy rent  rent own  import export  arrive depart
arrival departure  departure return  outbound return  morning evening  day night
daily weekly  weekly monthly  monthly yearly  monthly annual  daily monthly
weekday weekend  summer winter  spring autumn  spring fall  hourly daily
minute hour  hours minutes  seconds minutes  km miles  kilometers miles  kg lb
kg pounds  celsius fahrenheit  metric imperial  gb mb  tb gb  kb mb  usd eur
dollars euros  dollar euro  pounds dollars  inch cm  inches centimeters  feet meters
""".split()
#: Prefixes that reverse a word ("uninstall") or make it another action ("reinstall").
_PREFIXES: Final = ("un", "dis", "de", "in", "im", "il", "ir", "non", "anti", "re", "pre",
                    "post", "over", "under", "mis", "counter")
_ENDINGS: Final = ("ing", "ed", "es", "s")
#: The most leftover words compared pairwise for opposites (a cap on the work: prompts that
#: differ in more words than this are rewrites whose opposites the model and similarity judge).
MAX_LEFT: Final = 64


def _base(word: str) -> str:
    if len(word) >= 5:
        for end in _ENDINGS:
            if word.endswith(end):
                return word[: -len(end)]
    return word


_OPPOSITE: Final = frozenset(
    frozenset((_base(a), _base(b))) for a, b in zip(_PAIRS[::2], _PAIRS[1::2], strict=True))


#: Quantifiers: one swapped for another changes the question ("all" / "any" / "only some").
_QUANTIFIERS: Final = frozenset(
    "all any every each some most few several only none many much both either neither "
    "single least".split())
#: Words that leave two blocks in symmetric roles ("a cocktail and a mocktail").
_SYMMETRIC: Final = frozenset("and or nor both a an the vs versus".split())
#: The most words (after the shared start and end) searched for two blocks trading places.
MAX_SWAP: Final = 64


def opposites(x: str, y: str) -> bool:
    """Whether two (base) words are a pair of the lexicon, two quantifiers, or one is the
    other prefixed."""
    if frozenset((x, y)) in _OPPOSITE or (x in _QUANTIFIERS and y in _QUANTIFIERS):
        return True
    short, long_ = (x, y) if len(x) <= len(y) else (y, x)
    return len(short) >= 3 and any(long_ == p + short for p in _PREFIXES)


def blocks_swapped(a: list[str], b: list[str]) -> bool:
    """Whether ``b`` is ``a`` with two blocks trading places around the same words: "merge
    main into my branch" / "merge my branch into main", "the cat chases the puppy" / "the
    puppy chases the cat"; not around symmetric words only ("X and Y"), and not a clause
    moved whole (nothing between the blocks)."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    x, y = a[start:len(a) - end], b[start:len(b) - end]
    n = len(x)
    if n != len(y) or n < 3 or n > MAX_SWAP:
        return False
    heads = [i for i in range(1, n - 1) if y[n - i:] == x[:i]]  # y ends with x's first block
    tails = [j for j in range(1, n - 1) if y[:j] == x[n - j:]]  # y starts with x's last one
    for i in heads:
        for j in tails:
            middle = x[i:n - j]
            if i + j < n and middle == y[j:n - i] and not set(middle) <= _SYMMETRIC:
                return True
    return False


def contrast_agrees(query: str, candidate: str, *, stopwords: frozenset[str] | set[str],
                    words: list[str], other: list[str]) -> bool:
    """See the module docstring; ``words`` and ``other`` are the two texts' words (as
    :func:`~promptcache.cache.semantic.rules.words` gives them)."""
    del query, candidate  # the caller has tokenised them
    q, c = Counter(map(_base, words)), Counter(map(_base, other))
    left_q, left_c = set(q - c), set(c - q)
    if not left_q and not left_c:
        return not blocks_swapped(words, other)
    if len(left_q) <= MAX_LEFT and len(left_c) <= MAX_LEFT:
        if any(opposites(x, y) for x in left_q for y in left_c):
            return False
    written = {_base(w): w for w in (*words, *other)}

    def content(base: str) -> bool:  # numbers are the numbers rule's, names the entities'
        w = written[base]
        return w not in stopwords and "'" not in w and not any(ch.isdigit() for ch in w)

    swapped_q, swapped_c = [w for w in left_q if content(w)], [w for w in left_c if content(w)]
    return not (len(swapped_q) == len(swapped_c) == 1
                and not same_family(swapped_q[0], swapped_c[0]))


def same_family(x: str, y: str) -> bool:
    """Two forms of one word ("differ" / "difference", "deliver" / "delivery"): the shorter
    (of 4 letters or more) starts the longer, or does but for a final "e" or "y" ("realise"
    / "realising", "apply" / "applies" aside). Not "internal" / "international"."""
    short, long_ = (x, y) if len(x) <= len(y) else (y, x)
    if len(short) >= 4 and long_.startswith(short):
        return True
    return len(short) >= 6 and short[-1] in "ey" and long_.startswith(short[:-1])
