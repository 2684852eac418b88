"""The staff pages through Flask's client: each renders, in both languages, for the roles
and tenants allowed to see it — and for no one else."""

from __future__ import annotations

import pytest

from tests.wallet_fixtures import Wallet, set_up_bus_company

PAGES = ["/", "/clearing?day=2026-11-25", "/records", "/registry", "/devices"]


def logged_in(wallet: Wallet, token: str):  # type: ignore[no-untyped-def]
    client = wallet.client()
    assert client.post("/login", data={"token": token}).status_code == 302
    return client


@pytest.mark.parametrize("page", [*PAGES, "/reconciliation"])
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_page_renders_for_an_admin(wallet: Wallet, page: str, lang: str) -> None:
    set_up_bus_company(wallet)
    separator = "&" if "?" in page else "?"
    answer = logged_in(wallet, wallet.admin_token).get(f"{page}{separator}lang={lang}")
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    assert ("手机公交卡业务管理平台" if lang == "zh" else "Mobile bus card platform") in text


def test_staff_see_their_own_company_only(wallet: Wallet) -> None:
    first = set_up_bus_company(wallet, "BUS1", "000012000001")
    set_up_bus_company(wallet, "BUS2", "000022000001")
    client = logged_in(wallet, first.staff_token)
    registry = client.get("/registry?operator=BUS2&lang=en").get_data(as_text=True)
    assert "V1201" in registry and "BUS2" not in registry  # BUS2 is not even offered
    assert client.get("/reconciliation").status_code == 403
    page = client.get("/clearing?day=2026-11-25").get_data(as_text=True)
    assert "run-clearing" not in page  # only administrators run clearing


def test_pages_need_a_login_and_forms_need_their_csrf_token(wallet: Wallet) -> None:
    client = wallet.client()
    answer = client.get("/records")
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]
    assert client.post("/login", data={"token": "wrong"}).status_code == 200
    admin = logged_in(wallet, wallet.admin_token)
    assert admin.post("/clearing", data={"day": "2026-11-25"}).status_code == 400
    assert admin.get("/logout").status_code == 302
    assert admin.get("/").status_code == 302


def test_the_three_way_match_from_an_uploaded_bank_statement(wallet: Wallet) -> None:
    import io

    admin = logged_in(wallet, wallet.admin_token)
    csrf = admin.get("/reconciliation?lang=en").get_data(as_text=True)
    token = csrf.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    statement = (
        "kind,id,payment_id,order_id,amount_fen,at\r\n"
        "payment,pay_1,pay_1,NOSUCH-ORDER,3000,2026-11-24T10:00:00\r\n"
    )
    answer = admin.post(
        "/reconciliation?lang=en",
        data={
            "csrf": token,
            "day": "2026-11-24",
            "statement": (io.BytesIO(statement.encode()), "statement.csv"),
        },
        content_type="multipart/form-data",
    ).get_data(as_text=True)
    assert 'id="match-result"' in answer and "Differences found" in answer
    assert "paid_unknown_order" in answer and "NOSUCH-ORDER" in answer
    broken = admin.post(
        "/reconciliation?lang=en",
        data={"csrf": token, "day": "2026-11-24", "statement": (io.BytesIO(b"x,y\n"), "s.csv")},
        content_type="multipart/form-data",
    ).get_data(as_text=True)
    assert 'id="match-error"' in broken and "header" in broken
