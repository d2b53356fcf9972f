"""The audit log's masker: customer identifiers in free text are replaced by placeholders before anything is written.

Promised categories (tests/data/masking-corpus.jsonl holds realistic cases of each; none may leak):

- ``[EMAIL]``: ``local@host`` addresses, any case, plus-addressing, single-label hosts (``user@localhost``),
  IP-literal hosts (``admin@[10.0.0.1]``).
- ``[IBAN]``: IBANs of every registered country, any case, with or without spaces or dashes (any grouping), glued to
  words (``iban:gb82west...``, ``ibanGB82...``), mod-97 valid. ``[IBAN_LIKE]``: the same shape (a known country
  code, its exact length, at least 8 digits) failing mod-97 -- a mistyped IBAN is still the customer's account.
- ``[CARD]``: 13-19 digits, Luhn-valid, contiguous or grouped by spaces, dashes (any Unicode dash), dots or
  underscores, glued to letters or not (``card4111111111111111``).
- ``[CVV]`` / ``[PIN]``: the 3-8 digits (spaced or not) up to four words after a CVV/CVC/CV2/CSC/security-code/
  "3 digits" phrase, or a PIN, passcode, OTP, one-time/verification code phrase (``my pin is 1234``, ``cvv: 123``,
  ``PIN=0000``, ``the 3 digits on the back are 308``), and before ``is my pin``.
- ``[SSN]``: US social security numbers written 123-45-6789 (or with spaces), or 9 digits after ``SSN``.
- ``[SORT_CODE]``: UK sort codes 12-34-56 or 12 34 56 anywhere (a dd-mm-yy date is masked too), and 6 digits in
  any grouping after ``sort code``/``sortcode``/``s/c``/``sc``.
- ``[ACCOUNT]``: any run of 7-12 digits (glued to letters or not), and 6-12 digits in any grouping after
  ``account``/``acct``/``acc``/``a/c``/``routing``.
- ``[PHONE]``: numbers with an international prefix (``+44 20 7946 0958``, ``0044 ...``, ``+1 (555) 010-9999``)
  of 7-15 digits, 7-15 digits after ``phone``/``tel``/``mobile``/``call``/``number``/``fax`` (not a date), and any
  grouped number of 9-12 digits.
- ``[NUMBER]``: whatever long digit sequence is left: a contiguous run of 13 or more digits that is not a card
  (e.g. a mistyped card), and 13 or more digits in one grouped sequence.

Digit boundaries are look-arounds on digits, never ``\\b`` (an underscore or a letter glued to a number is not a
boundary for ``\\b``). Left alone on purpose: amounts, dates (8 digits at most), times, short reference numbers, and
numbers of up to 6 digits without a keyword (``transfer reference 123456``, ``card ending in 4242``). Not promised:
passwords and names (free text has no shape to find them by).
"""

from __future__ import annotations

import re

# Separators people put inside a number: spaces (incl. no-break and thin), dashes of every kind, dots, underscores,
# and the invisible format characters a copy-paste can carry.
_SEP_CHARS = r" \t\u00a0\u2000-\u200d\u2060\ufeff\u202f\u205f\u3000\-\u2010-\u2015\u2212\u2043\ufe58\ufe63\uff0d._"
_SEP = f"[{_SEP_CHARS}]"
_DASH_OR_SPACE = r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000\-\u2010-\u2015\u2212\ufe58\ufe63\uff0d]"
# Keywords must not be the tail of a longer word ("shopping" is not "pin"), nor a placeholder ("[CVV]", "[ACCOUNT]").
_NOT_LETTER_BEFORE = r"(?<![^\W\d_])(?<!\[)"
_NOT_LETTER_AFTER = r"(?![^\W\d_])"

# A match may start only where a local part starts (the look-behind): without it, a long word and a late "@" cost
# quadratic time. Hosts may be a single label (user@localhost).
_LOCAL = r"[\w.!#$%&'*+/=?^`{|}~-]"
EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@(?:\[[0-9A-Fa-f.:]{{2,45}}\]|[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*)")

# A sequence of digit groups joined by up to three separator characters ("4111 1111", "4111 - 1111").
_GROUPS = re.compile(rf"\d+(?:{_SEP}{{1,3}}\d+)*")
# The same with the brackets and slashes of phone numbers ("+44 (0)20 7946 0958", "030/1234567").
_PHONE_GROUPS = rf"\(?\d+(?:(?:{_SEP}|[()/]){{1,3}}\d+)*\)?"
_INTL_PHONE = re.compile(rf"(?:\+|(?<!\d)00(?=[1-9])){_SEP}?{_PHONE_GROUPS}")  # no country code starts with 0
_GROUPED = re.compile(rf"(?<!\d){_PHONE_GROUPS}")
_RUN = re.compile(r"(?<!\d)\d{7,}(?!\d)")

_CVV_WORDS = (r"cvv2?|cvc2?|cv2|cvn|csc|cid|card\s*(?:security|verification)\s*(?:code|value|number)"
              r"|security\s*(?:code|number|digits)|(?:3|three|4|four)[\s-]*digits?(?:\s*(?:code|number))?")
_PIN_WORDS = (r"(?:my)?pins?(?:\s*(?:code|number|no))?|pass\s*code|passcode|otp|one[\s-]*time\s*(?:pass)?(?:code|password)"
              r"|verification\s*code|auth(?:entication|orisation|orization)?\s*code|access\s*code|memorable\s*number")
# At most four short words between a keyword and its number, never across a placeholder ("[CVV], zip 90210").
_GAP = r"(?:[^\w\[]|_)*(?:[^\W\d_]{1,10}'?[^\W\d_]{0,3}(?:[^\w\[]|_)+){0,4}?"
_SECRET_DIGITS = r"\d(?:[ .\-]?\d){2,7}(?!\d)"
_SECRET_AFTER = re.compile(
    rf"{_NOT_LETTER_BEFORE}(?:(?P<cvv>{_CVV_WORDS})|(?P<pin>{_PIN_WORDS})){_NOT_LETTER_AFTER}{_GAP}"
    rf"(?<!\d)(?P<digits>{_SECRET_DIGITS})", re.IGNORECASE)
_SECRET_BEFORE = re.compile(
    rf"(?<!\d)(?P<digits>{_SECRET_DIGITS})\s+(?:is|was|=|are)\s+(?:my|the|your)?\s*(?:new\s+|old\s+|card\s+)?"
    rf"(?:(?P<cvv>{_CVV_WORDS})|(?P<pin>{_PIN_WORDS})){_NOT_LETTER_AFTER}", re.IGNORECASE)

_SSN = re.compile(r"(?<!\d)\d{3}([ \-\u2010-\u2015\u2212])\d{2}\1\d{4}(?!\d)")
_ANY_GROUPING = rf"\d(?:{_SEP}{{0,3}}\d)*(?!\d)"
_SSN_CONTEXT = re.compile(rf"{_NOT_LETTER_BEFORE}(?:ssn|social\s*security(?:\s*(?:number|no))?){_NOT_LETTER_AFTER}"
                          rf"{_GAP}(?<!\d)(?P<digits>{_ANY_GROUPING})", re.IGNORECASE)
_SORT_CODE = re.compile(rf"(?<!\d)\d{{2}}({_DASH_OR_SPACE})\d{{2}}\1\d{{2}}(?!\d)")
_SORT_CONTEXT = re.compile(rf"{_NOT_LETTER_BEFORE}(?:sort[\s_-]*code|s/c|sc|bank\s*code)s?{_NOT_LETTER_AFTER}"
                           rf"{_GAP}(?<!\d)(?P<digits>{_ANY_GROUPING})", re.IGNORECASE)
_ACCOUNT_CONTEXT = re.compile(
    rf"{_NOT_LETTER_BEFORE}(?:my)?(?:account|acct|acc|a/c|routing)s?{_NOT_LETTER_AFTER}{_GAP}(?<!\d)(?P<digits>{_ANY_GROUPING})",
    re.IGNORECASE)
_PHONE_CONTEXT = re.compile(
    rf"{_NOT_LETTER_BEFORE}(?:phone|tel|telephone|mobile|cell|call|ring|text|whatsapp|landline|number|fax)(?:s|ed|ing)?"
    rf"{_NOT_LETTER_AFTER}{_GAP}(?<![\d+])(?P<digits>{_PHONE_GROUPS})", re.IGNORECASE)

# IBAN lengths by country (SWIFT's IBAN registry, plus the countries that use IBANs outside it).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AO": 25, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BF": 28, "BG": 22, "BH": 22,
    "BI": 27, "BJ": 28, "BR": 29, "BY": 28, "CF": 27, "CG": 27, "CH": 21, "CI": 28, "CM": 27, "CR": 22, "CV": 25,
    "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "DZ": 26, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GA": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GQ": 27, "GR": 27, "GT": 28,
    "GW": 25, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IR": 26, "IS": 26, "IT": 27, "JO": 30,
    "KM": 27, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MA": 28,
    "MC": 27, "MD": 24, "ME": 22, "MG": 27, "MK": 19, "ML": 28, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "MZ": 25,
    "NE": 28, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24,
    "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SN": 28, "SO": 23,
    "ST": 25, "SV": 28, "TD": 27, "TG": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}
_IBAN_START = re.compile(r"(?=([A-Za-z]{2})\d{2})")
_IBAN_SEP = frozenset(" \t\u00a0\u2009\u202f-\u2010\u2011\u2012\u2013\u2014.")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of card numbers (`digits` holds decimal digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616's mod-97 check of an IBAN written without separators (any case)."""
    s = iban.upper()
    s = s[4:] + s[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in s)) % 97 == 1
    except ValueError:
        return False


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _mask_ibans(text: str) -> str:
    """IBANs: every place two letters and two digits start, read the country's length (groups of four may be spaced)."""
    spans: list[tuple[int, int, str]] = []
    end_of_last = 0
    for m in _IBAN_START.finditer(text):
        start = m.start()
        length = IBAN_LENGTHS.get(m.group(1).upper())
        if length is None or start < end_of_last:
            continue
        chars, i = [], start
        while i < len(text) and len(chars) < length:
            ch = text[i]
            if ch.isascii() and ch.isalnum():
                chars.append(ch)
                i += 1
            elif ch in _IBAN_SEP and len(chars) >= 4 and i + 1 < len(text) and text[i + 1].isalnum():
                i += 1  # one separator between characters (printed IBANs group by four; people group as they like)
            else:
                break
        if len(chars) != length:
            continue
        iban = "".join(chars)
        if iban_ok(iban):
            spans.append((start, i, "[IBAN]"))
        elif sum(ch.isdigit() for ch in iban[4:]) >= 8:
            spans.append((start, i, "[IBAN_LIKE]"))
        else:
            continue
        end_of_last = i
    for start, end, mark in reversed(spans):
        text = text[:start] + mark + text[end:]
    return text


_CARD_MAX_GROUPS = 6  # printed cards use 1-5 groups (4-4-4-4-3 is the most); a bound keeps long digit lists linear


def _mask_cards(text: str) -> str:
    """In each sequence of digit groups, the longest run of whole groups with 13-19 digits passing Luhn is a card."""
    def one(m: re.Match) -> str:
        seq = m.group(0)
        groups = [(g.start(), g.end()) for g in re.finditer(r"\d+", seq)]
        out, pos, i = [], 0, 0
        while i < len(groups):
            found = None
            n = 0
            for j in range(i, min(i + _CARD_MAX_GROUPS, len(groups))):
                n += groups[j][1] - groups[j][0]
                if n > 19:
                    break
                if n >= 13 and luhn_ok(_digits(seq[groups[i][0]:groups[j][1]])):
                    found = j  # keep looking: the longest valid run wins
            if found is None:
                i += 1
                continue
            out.append(seq[pos:groups[i][0]] + "[CARD]")
            pos, i = groups[found][1], found + 1
        out.append(seq[pos:])
        return "".join(out)

    return _GROUPS.sub(one, text)


def _replace_digits(mark_for):
    """A re.sub callback replacing only the `digits` group of a context match with the placeholder it names."""
    def one(m: re.Match) -> str:
        mark = mark_for(m)
        if mark is None:
            return m.group(0)
        start, end = m.start("digits") - m.start(), m.end("digits") - m.start()
        whole = m.group(0)
        return whole[:start] + mark + whole[end:]
    return one


def _secret_mark(m: re.Match) -> str:
    return "[CVV]" if m.group("cvv") else "[PIN]"


def _date_like(text: str) -> bool:
    """2024-03-15, 15.03.2024, 3/15/2024: left alone by the context rules (a date after "account" is not a number)."""
    parts = [int(p) for p in re.findall(r"\d+", text)]
    lens = [len(p) for p in re.findall(r"\d+", text)]
    if len(parts) != 3:
        return False
    if lens[0] == 4:
        year, a, b = parts
    elif lens[2] in (2, 4) and lens[0] <= 2 and lens[1] <= 2:
        a, b, year = parts
        year = year + 2000 if lens[2] == 2 else year
    else:
        return False
    return 1900 <= year <= 2099 and ((1 <= a <= 12 and 1 <= b <= 31) or (1 <= a <= 31 and 1 <= b <= 12))


def _count_mark(lo: int, hi: int, mark: str, dates: bool = False):
    """Mask the context's number when it has lo..hi digits (and, unless `dates`, does not read as a date)."""
    def mark_for(m: re.Match) -> str | None:
        digits = m.group("digits")
        return mark if lo <= len(_digits(digits)) <= hi and (dates or not _date_like(digits)) else None
    return mark_for


def _phone(m: re.Match) -> str:
    n = len(_digits(m.group(0)))
    return "[PHONE]" if 7 <= n <= 15 else ("[NUMBER]" if n > 15 else m.group(0))


def _grouped(m: re.Match) -> str:
    n = len(_digits(m.group(0)))
    if n >= 13:
        return "[NUMBER]"
    return "[PHONE]" if n >= 9 else m.group(0)


def _run(m: re.Match) -> str:
    return "[ACCOUNT]" if len(m.group(0)) <= 12 else "[NUMBER]"


def mask(text: str) -> str:
    """Replace customer identifiers in `text` with placeholders (the categories of this module's docstring)."""
    if not text:
        return text
    text = EMAIL.sub("[EMAIL]", text)  # first: an address may hold digits or look like an IBAN
    text = _mask_ibans(text)
    if not any(ch.isdigit() for ch in text):
        return text  # every rule below is about digits: most text stops here
    text = _mask_cards(text)
    text = _SECRET_AFTER.sub(_replace_digits(_secret_mark), text)
    text = _SECRET_BEFORE.sub(_replace_digits(_secret_mark), text)
    text = _SSN.sub("[SSN]", text)
    text = _SSN_CONTEXT.sub(_replace_digits(_count_mark(9, 9, "[SSN]", dates=True)), text)
    text = _INTL_PHONE.sub(_phone, text)  # before sort codes: "+33 1 23 45 67 89" holds a 2-2-2 shape
    text = _SORT_CODE.sub("[SORT_CODE]", text)
    text = _SORT_CONTEXT.sub(_replace_digits(_count_mark(6, 6, "[SORT_CODE]", dates=True)), text)
    text = _ACCOUNT_CONTEXT.sub(_replace_digits(_count_mark(6, 12, "[ACCOUNT]")), text)
    text = _PHONE_CONTEXT.sub(_replace_digits(_count_mark(7, 15, "[PHONE]")), text)
    text = _RUN.sub(_run, text)  # a long run glued to letters or underscores too ("acct_12345678")
    text = _GROUPED.sub(_grouped, text)
    return text
