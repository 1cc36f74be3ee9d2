"""A PKCS#11 application in one process, for tests (run with /usr/bin/python3, PyKCS11).

    p11_client.py MODULE  < operations.json  > results.json

Reads a JSON list of operations on stdin (so that PINs never appear on a command line),
runs them in order in one PKCS#11 session (C_Initialize once, as a browser does) and prints
one JSON object: {"results": [...]} with one entry per operation. A failing call is a result
({"rv": "CKR_..."}), not an exception: tests compare results between the desk's pcscd and
the shim. Operations:

  {"op": "slots"}                         every slot: description, token present
  {"op": "token"}                         the first slot with a token: C_GetTokenInfo
  {"op": "open"}                          C_OpenSession (serial, read-only)
  {"op": "login", "pin": "1234"}          C_Login(CKU_USER)
  {"op": "logout"}
  {"op": "objects"}                       C_FindObjects(all): class, label, id, private
  {"op": "cert", "label": L} | {"id": H}  a certificate's DER value
  {"op": "read_data", "label": L}         a data object's value (CKA_VALUE)
  {"op": "sign", "key": L|"id": H, "mechanism": "RSA_PKCS"|"SHA256_RSA_PKCS"|..., "data": HEX,
   "pss": {"hash": "SHA256", "mgf": "MGF1_SHA256", "salt": 32}}
  {"op": "mechanisms"}                    C_GetMechanismList of the token's slot
"""
import json
import sys

import PyKCS11

TOKEN_FLAGS = ["CKF_RNG", "CKF_WRITE_PROTECTED", "CKF_LOGIN_REQUIRED", "CKF_USER_PIN_INITIALIZED",
               "CKF_PROTECTED_AUTHENTICATION_PATH", "CKF_TOKEN_INITIALIZED", "CKF_USER_PIN_COUNT_LOW",
               "CKF_USER_PIN_FINAL_TRY", "CKF_USER_PIN_LOCKED", "CKF_USER_PIN_TO_BE_CHANGED",
               "CKF_SO_PIN_COUNT_LOW", "CKF_SO_PIN_FINAL_TRY", "CKF_SO_PIN_LOCKED"]
CLASS_NAMES = {PyKCS11.CKO_CERTIFICATE: "certificate", PyKCS11.CKO_PRIVATE_KEY: "private_key",
               PyKCS11.CKO_PUBLIC_KEY: "public_key", PyKCS11.CKO_DATA: "data", 9: "profile"}  # CKO_PROFILE (3.0)


def rv_name(e):
    code = getattr(e, "value", None)
    if isinstance(code, int):
        code &= 0xFFFFFFFF  # PyKCS11 keeps CK_RV signed
        if code == 0x80000001:
            return "CKR_VENDOR_DEFINED+1"
        name = PyKCS11.CKR.get(code)
        return name if isinstance(name, str) else "0x%08X" % code
    return "error: %s" % e


def text(s):
    return s.replace("\x00", " ").strip()


def flags_of(value, names):
    return sorted(n for n in names if value & getattr(PyKCS11, n))


class Client:
    def __init__(self, module):
        self.lib = PyKCS11.PyKCS11Lib()
        self.lib.load(module)
        self.session = None
        self.slot = None

    def token_slot(self):
        if self.slot is None:
            slots = self.lib.getSlotList(tokenPresent=True)
            if not slots:
                raise LookupError("no slot with a token")
            self.slot = slots[0]
        return self.slot

    def op_slots(self, c):
        out = []
        for s in self.lib.getSlotList(tokenPresent=False):
            info = self.lib.getSlotInfo(s)
            out.append({"description": text(info.slotDescription),
                        "token_present": bool(info.flags & PyKCS11.CKF_TOKEN_PRESENT)})
        return {"slots": out}

    def op_token(self, c):
        t = self.lib.getTokenInfo(self.token_slot())
        return {"label": text(t.label), "serial": text(t.serialNumber), "manufacturer": text(t.manufacturerID),
                "model": text(t.model), "flags": flags_of(t.flags, TOKEN_FLAGS),
                "pin_min": t.ulMinPinLen, "pin_max": t.ulMaxPinLen,
                "slot": text(self.lib.getSlotInfo(self.token_slot()).slotDescription)}

    def op_open(self, c):
        self.session = self.lib.openSession(self.token_slot(), PyKCS11.CKF_SERIAL_SESSION)
        return {}

    def op_login(self, c):
        self.session.login(c["pin"])
        return {}

    def op_logout(self, c):
        self.session.logout()
        return {}

    def op_mechanisms(self, c):
        return {"mechanisms": sorted(str(m) for m in self.lib.getMechanismList(self.token_slot()))}

    def _attrs(self, o, types):
        return self.session.getAttributeValue(o, types)

    def op_objects(self, c):
        out = []
        for o in self.session.findObjects():
            cls, label, oid, private = self._attrs(o, [PyKCS11.CKA_CLASS, PyKCS11.CKA_LABEL, PyKCS11.CKA_ID,
                                                        PyKCS11.CKA_PRIVATE])
            out.append({"class": CLASS_NAMES.get(cls, str(cls)), "label": label,
                        "id": bytes(oid or b"").hex(), "private": bool(private)})
        out.sort(key=lambda x: (x["class"], x["label"], x["id"]))
        return {"objects": out}

    def _find(self, cls, c):
        tmpl = [(PyKCS11.CKA_CLASS, cls)]
        if "id" in c:
            tmpl.append((PyKCS11.CKA_ID, bytes.fromhex(c["id"])))
        if "label" in c:
            tmpl.append((PyKCS11.CKA_LABEL, c["label"]))
        if "key" in c:
            tmpl.append((PyKCS11.CKA_LABEL, c["key"]))
        found = self.session.findObjects(tmpl)
        if not found:
            raise LookupError("no object %s" % tmpl)
        return found[0]

    def op_cert(self, c):
        o = self._find(PyKCS11.CKO_CERTIFICATE, c)
        return {"der": bytes(self._attrs(o, [PyKCS11.CKA_VALUE])[0]).hex()}

    def op_read_data(self, c):
        o = self._find(PyKCS11.CKO_DATA, c)
        return {"value": bytes(self._attrs(o, [PyKCS11.CKA_VALUE])[0]).hex()}

    def op_sign(self, c):
        key = self._find(PyKCS11.CKO_PRIVATE_KEY, c)
        name = c.get("mechanism", "RSA_PKCS")
        mech_type = getattr(PyKCS11, "CKM_" + name)
        if "pss" in c:
            p = c["pss"]
            mech = PyKCS11.RSA_PSS_Mechanism(mech_type, getattr(PyKCS11, "CKM_" + p["hash"]),
                                             getattr(PyKCS11, "CKG_" + p["mgf"]), p["salt"])
        else:
            mech = PyKCS11.Mechanism(mech_type, None)
        sig = self.session.sign(key, bytes.fromhex(c["data"]), mech)
        return {"signature": bytes(sig).hex()}


def main():
    module = sys.argv[1]
    ops = json.load(sys.stdin)
    results = []
    try:
        client = Client(module)
    except PyKCS11.PyKCS11Error as e:
        print(json.dumps({"load_error": rv_name(e), "results": []}))
        return 0
    for c in ops:
        r = {"op": c["op"]}
        try:
            r.update(getattr(client, "op_" + c["op"])(c))
            r["rv"] = "CKR_OK"
        except PyKCS11.PyKCS11Error as e:
            r["rv"] = rv_name(e)
        except LookupError as e:
            r["rv"] = "not found: %s" % e
        except Exception as e:  # noqa: BLE001 - e.g. no session after a failed C_OpenSession
            r["rv"] = "error: %s: %s" % (type(e).__name__, e)
        results.append(r)
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
