"""
Privacy: personal data and secrets in a document replaced by typed placeholders (<EMAIL>, <PHONE>, <IP>,
<CREDIT_CARD>, <SSN>, <IBAN>, <SECRET>), as in BigScience's and FineWeb's PII passes, with checks that keep
ordinary numbers intact: card numbers must pass the Luhn check and carry a card network's prefix, IBANs
their mod-97 check, IP addresses must parse, and a phone number needs a phone's punctuation (a leading +,
(area) code, or grouped digits), so dates, versions, prices, ISBNs and plain long numbers stay as written.

    from nanoforge.curation.pii import redact
    text, counts = redact("mail me at a@b.org")  # -> ("mail me at <EMAIL>", {"EMAIL": 1})
"""
import ipaddress
import re

# API keys and tokens whose format is public: a false positive here costs little, a leak costs a lot
SECRET = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"  # PEM private keys
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                          # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"                         # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{40,}\b"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"                        # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}"                                # Google API keys
    r"|\b[sr]k_(?:live|test)_[0-9A-Za-z]{20,}"                 # Stripe keys
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"                 # OpenAI / Anthropic keys
    r"|\bhf_[A-Za-z0-9]{30,}\b"                                # Hugging Face tokens
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JSON web tokens
    re.S)
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# 13-19 digits, optionally in groups split by single spaces or hyphens
CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}(?!\w|[.-]\d)"  # +44 20 7946 0958
    r"|(?<!\w)\(\d{3}\) ?\d{3}[ .-]\d{4}(?!\w)"                                       # (555) 123-4567
    r"|(?<![\w.-])\d{3}([.-])\d{3}\1\d{4}(?![\w]|[.-]\d)"                             # 555-123-4567
    r"|(?<![\w.-])0\d{2,4} \d{3,4} \d{3,4}(?!\w|[ .-]\d)")                             # 020 7946 0958
KINDS = ("SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "SSN", "IP", "PHONE")


def luhn_ok(digits):
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = int(d)
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


def card_ok(digits):
    """A payment card: Luhn-valid, and a network's prefix and length (Visa, Mastercard, Amex, Discover, JCB,
    Diners), so an ISBN-13 (978...) or a Luhn-valid order number that no network issues is left alone."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    network = ((digits[0] == "4" and n in (13, 16, 19)) or (51 <= p2 <= 55 and n == 16)
               or (2221 <= p4 <= 2720 and n == 16) or (p2 in (34, 37) and n == 15)
               or ((digits.startswith("6011") or p2 == 65 or 644 <= int(digits[:3]) <= 649) and n in (16, 19))
               or (3528 <= p4 <= 3589 and n == 16) or (p2 in (36, 38) and n == 14))
    return network and luhn_ok(digits)


def iban_ok(text):
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def ssn_ok(m):
    area, group, serial = m.group(1), m.group(2), m.group(3)
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def ipv6_ok(text):
    # "12:30:45" and "dead::beef" parse or nearly so: ask for a real address with a digit and 3+ groups
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text) and len([g for g in text.split(":") if g]) >= 2 and len(text) >= 6


def phone_ok(text):
    return 7 <= sum(c.isdigit() for c in text) <= 15


def ipv4_ok(text, start, whole):
    # "version 1.2.3.4" or "v1.2.3.4" is a version number, not an address
    before = whole[max(0, start - 9):start].lower()
    return not (before.endswith("v") or "version" in before or "release" in before)


# (kind, pattern, check): checks see the match; the order matters, secrets and emails first so their
# digits are gone before the number patterns run
RULES = (
    ("SECRET", SECRET, None),
    ("EMAIL", EMAIL, None),
    ("IBAN", IBAN, lambda m, t: iban_ok(m.group())),
    ("CREDIT_CARD", CARD, lambda m, t: card_ok(re.sub(r"\D", "", m.group()))),
    ("SSN", SSN, lambda m, t: ssn_ok(m)),
    ("IP", IPV6, lambda m, t: ipv6_ok(m.group())),
    ("IP", IPV4, lambda m, t: ipv4_ok(m.group(), m.start(), t)),
    ("PHONE", PHONE, lambda m, t: phone_ok(m.group())),
)


def redact(text, kinds=KINDS):
    """(text with each piece of personal data of the given kinds replaced by <KIND>, {kind: count})."""
    counts = {}
    for kind, pattern, check in RULES:
        if kind not in kinds:
            continue

        def replace(m, kind=kind, check=check, current=text):
            if check is None or check(m, current):
                counts[kind] = counts.get(kind, 0) + 1
                return f"<{kind}>"
            return m.group()
        text = pattern.sub(replace, text)
    return text, counts
