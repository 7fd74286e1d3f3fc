"""SQL statement splitting (DSL §2.3): `;` ends a statement only outside quotes, bodies and comments."""
from noetl_worker.sql import split_sql


def test_plain_statements_are_split_and_stripped():
    assert split_sql("SELECT 1; SELECT 2 ;\n\n SELECT 3") == ["SELECT 1", "SELECT 2", "SELECT 3"]


def test_semicolon_inside_single_quotes_with_doubled_quote_escape():
    sql = "INSERT INTO t VALUES ('a;b', 'it''s; fine'); SELECT 1"
    assert split_sql(sql) == ["INSERT INTO t VALUES ('a;b', 'it''s; fine')", "SELECT 1"]


def test_semicolon_inside_double_quoted_identifier():
    assert split_sql('SELECT 1 AS "a;b"; SELECT 2') == ['SELECT 1 AS "a;b"', "SELECT 2"]


def test_dollar_quoted_bodies_keep_their_semicolons():
    sql = ("CREATE FUNCTION f(x INT) RETURNS INT AS $fn$ SELECT x * 2; $fn$ LANGUAGE sql;\n"
           "DO $$ BEGIN PERFORM 1; END $$; SELECT f(2)")
    assert split_sql(sql) == [
        "CREATE FUNCTION f(x INT) RETURNS INT AS $fn$ SELECT x * 2; $fn$ LANGUAGE sql",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SELECT f(2)",
    ]


def test_positional_parameters_are_not_dollar_quotes():
    assert split_sql("SELECT $1; SELECT $2") == ["SELECT $1", "SELECT $2"]


def test_line_comments_hide_semicolons_and_comment_only_fragments_are_dropped():
    sql = "-- a comment; with a semicolon\nSELECT 1; -- trailing; comment\n-- only a comment;\n"
    assert split_sql(sql) == ["-- a comment; with a semicolon\nSELECT 1"]


def test_block_comments_including_nested_ones():
    sql = "/* one; /* nested; */ still; */ SELECT 1; /* only; a comment */ ; SELECT 2"
    assert split_sql(sql) == ["/* one; /* nested; */ still; */ SELECT 1", "SELECT 2"]


def test_quotes_inside_comments_do_not_open_strings():
    sql = "-- don't stop here\nSELECT 1; /* it's */ SELECT 2"
    assert split_sql(sql) == ["-- don't stop here\nSELECT 1", "/* it's */ SELECT 2"]


def test_comment_markers_inside_strings_are_text():
    assert split_sql("SELECT '--not; a comment', '/*x;*/'; SELECT 2") == [
        "SELECT '--not; a comment', '/*x;*/'", "SELECT 2"]


def test_escape_string_with_backslash_quote():
    assert split_sql(r"SELECT E'a\'; b'; SELECT 2") == [r"SELECT E'a\'; b'", "SELECT 2"]


def test_empty_and_whitespace_only_input():
    assert split_sql("") == []
    assert split_sql("  ;\n ; -- nothing\n") == []


def test_unterminated_quote_keeps_the_rest_as_one_statement():
    assert split_sql("SELECT 'abc; SELECT 2") == ["SELECT 'abc; SELECT 2"]
