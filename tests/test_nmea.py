"""NmeaDecoder: framing of real serial-line faults, every talker and sentence, epoch assembly, dates."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.decode.nmea import GPS_ROLLOVER_S, KNOTS_TO_MPS, NmeaDecoder, checksum, decode_file, invalid_reason
from agent.record import Fix, iso_utc


def s(body: str, end: str = "\r\n") -> bytes:
    """A sentence with its correct checksum."""
    return f"${body}*{checksum(body.encode()):02X}{end}".encode()


RMC = "GPRMC,000941.00,A,4404.13387,N,12118.85628,W,0.029,,100117,,,A"
GGA = "GPGGA,000941.00,4404.13387,N,12118.85628,W,1,12,1.01,1144.8,M,-21.4,M,,"
RMC2 = "GPRMC,000942.00,A,4404.13401,N,12118.85633,W,0.041,12.5,100117,,,A"
GGA2 = "GPGGA,000942.00,4404.13401,N,12118.85633,W,1,12,1.01,1144.9,M,-21.4,M,,"
STREAM = s(RMC) + s(GGA) + s(RMC2) + s(GGA2)


def decode(data: bytes, **kwargs) -> tuple[list[tuple[float, Fix]], NmeaDecoder]:
    decoder = NmeaDecoder(**kwargs)
    return decoder.feed(data) + decoder.flush(), decoder


def test_checksum_matches_a_receivers_own():
    # From a u-blox 8 capture: $GNRMC,...*7D
    assert checksum(b"GNRMC,000941.00,A,4404.13387,N,12118.85628,W,0.029,,100117,,,A") == 0x7D
    assert checksum(b"") == 0 and checksum(b"A") == 0x41


def test_one_fix_per_epoch_merging_rmc_and_gga():
    fixes, decoder = decode(STREAM)
    assert [iso_utc(u) for u, _ in fixes] == ["2017-01-10T00:09:41.000Z", "2017-01-10T00:09:42.000Z"]
    utc, fix = fixes[0]
    assert fix.lat == pytest.approx(44 + 4.13387 / 60, abs=1e-12)
    assert fix.lon == pytest.approx(-(121 + 18.85628 / 60), abs=1e-12)
    assert (fix.alt_m, fix.geoid_sep_m, fix.quality, fix.sats_used, fix.hdop) == (1144.8, -21.4, 1, 12, 1.01)
    assert fix.speed_mps == pytest.approx(0.029 * KNOTS_TO_MPS)
    assert fix.course_deg is None and fixes[1][1].course_deg == 12.5
    assert fix.status == "A" and fix.faa_mode == "A"
    assert decoder.counters["sentences"] == 4 and decoder.counters["epochs"] == 2


def test_the_last_epoch_waits_for_flush_or_the_next_epoch():
    decoder = NmeaDecoder()
    assert len(decoder.feed(s(RMC) + s(GGA))) == 0  # the epoch may still grow
    assert len(decoder.flush()) == 1
    assert decoder.flush() == []


@pytest.mark.parametrize("end", ["\r\n", "\n", "\r", "\r\r\n"])
def test_line_endings(end):
    fixes, decoder = decode(s(RMC, end) + s(GGA, end) + s(RMC2, end))
    assert len(fixes) == 2 and decoder.counters["sentences"] == 3


def test_leading_garbage_nul_bytes_terminal_escapes_and_binary_between_sentences():
    ubx = bytes.fromhex("b562010720") + bytes(range(256))  # a UBX frame, with '$', CR and LF bytes in it
    data = b"\x00\x00garbage\x1b[2J\x1b[H" + s(RMC) + ubx + s(GGA) + b"\x00\x00" + s(RMC2) + b"\x1b[0m"
    fixes, decoder = decode(data)
    clean, _ = decode(s(RMC) + s(GGA) + s(RMC2))
    assert fixes == clean
    assert decoder.counters["sentences"] == 3


def test_two_sentences_merged_keep_the_complete_one():
    # A sentence cut short by the next one's start (a receiver buffer overrun).
    data = s(RMC) + s(GGA)[:30] + s(RMC2) + s(GGA2)
    fixes, decoder = decode(data)
    assert len(fixes) == 2
    assert decoder.counters["missing_checksum"] == 1
    # Two complete sentences with no line ending between them.
    fixes, _ = decode(s(RMC, end="") + s(GGA))
    assert len(fixes) == 1 and fixes[0][1].alt_m == 1144.8


def test_a_sentence_split_across_reads_and_lines():
    data = STREAM
    decoder = NmeaDecoder()
    out = []
    for i in range(0, len(data), 7):
        out += decoder.feed(data[i:i + 7])
    out += decoder.flush()
    assert out == decode(data)[0]


def test_bad_and_missing_checksums_are_rejected_and_counted():
    good = s(GGA)
    bad = good[:-4] + b"%02X\r\n" % (int(good[-4:-2], 16) ^ 1)
    fixes, decoder = decode(s(RMC) + bad + f"${RMC2}\r\n".encode())
    assert decoder.counters["bad_checksum"] == 1 and decoder.counters["missing_checksum"] == 1
    assert len(fixes) == 1 and fixes[0][1].alt_m is None  # the GGA was dropped


def test_receivers_without_checksums_with_the_option():
    data = f"${RMC}\r\n${GGA}\r\n${RMC2}\r\n".encode()
    assert decode(data)[0] == []
    fixes, decoder = decode(data, allow_missing_checksum=True)
    assert len(fixes) == 2 and fixes[0][1].alt_m == 1144.8
    assert decoder.counters["missing_checksum"] == 0


def test_overlong_lines_are_rejected_whole_even_when_split():
    long = ("GPGGA,000941.00," + "9" * 200).encode()
    decoder = NmeaDecoder()
    out = decoder.feed(s(RMC) + b"$" + long[:50]) + decoder.feed(long[50:] + b"\r\n" + s(GGA)) + decoder.flush()
    assert decoder.counters["overlong"] == 1
    assert len(out) == 1 and out[0][1].alt_m == 1144.8


def test_proprietary_ais_and_unknown_sentences_are_skipped_and_counted():
    data = s("PGRME,15.0,M,45.0,M,25.0,M") + b"!" + s("AIVDM,1,1,,A,13aEOK?P00PD2wVMdLDRhgvL289?,0")[1:] + s("SDDBT,18.0,f,5.4,M,3.0,F") + s(RMC)
    fixes, decoder = decode(data)
    assert decoder.counters["ignored"] == 3 and len(fixes) == 1


@pytest.mark.parametrize("talker", ["GP", "GN", "GL", "GA", "GB", "BD", "GQ", "QZ", "GI", "PQ"])
def test_every_constellation_talker(talker):
    fixes, _ = decode(s(talker + RMC[2:]) + s(talker + GGA[2:]))
    assert len(fixes) == 1 and fixes[0][1].quality == 1


def test_gns_gsa_gsv_vtg_gst_zda_contribute_to_the_epoch():
    data = b"".join(s(x) for x in [
        "GNGNS,000941.00,4404.13387,N,12118.85628,W,AAN,14,0.9,1144.8,-21.4,,,V",
        "GNGSA,A,3,23,09,16,07,26,03,27,22,,,,,1.71,1.01,1.38,1",
        "GNGSA,A,3,80,70,73,79,69,71,,,,,,,1.71,1.01,1.38,2",
        "GPGSV,2,1,05,02,05,307,,03,21,174,29,04,12,038,23,06,07,270,06",
        "GPGSV,2,2,05,07,46,259,26",
        "GLGSV,1,1,02,69,40,156,22,70,76,297,23",
        "GNVTG,54.7,T,34.4,M,5.5,N,10.2,K,A",
        "GNGST,000941.00,1.2,3.4,2.1,45.0,1.5,1.3,2.8",
        "GNZDA,000941.00,10,01,2017,00,00",
    ])
    fixes, _ = decode(data)
    assert len(fixes) == 1
    utc, fix = fixes[0]
    assert iso_utc(utc) == "2017-01-10T00:09:41.000Z"  # the date from ZDA
    assert (fix.quality, fix.sats_used, fix.hdop, fix.alt_m, fix.geoid_sep_m) == (1, 14, 0.9, 1144.8, -21.4)
    assert (fix.mode, fix.pdop, fix.vdop, fix.sats_in_view) == (3, 1.71, 1.38, 7)
    assert fix.course_deg == 54.7 and fix.speed_mps == pytest.approx(5.5 * KNOTS_TO_MPS)
    assert (fix.lat_err_m, fix.lon_err_m, fix.alt_err_m) == (1.5, 1.3, 2.8)


def test_sats_used_from_gsa_when_no_gga_says():
    data = s(RMC) + s("GNGSA,A,3,23,09,16,07,,,,,,,,,1.71,1.01,1.38,1") + s("GNGSA,A,3,80,70,,,,,,,,,,,1.71,1.01,1.38,2")
    fixes, _ = decode(data)
    assert fixes[0][1].sats_used == 6 and fixes[0][1].mode == 3


def test_receiver_that_sends_only_rmc():
    fixes, _ = decode(s(RMC) + s(RMC2))
    assert len(fixes) == 2 and fixes[0][1].alt_m is None and fixes[1][1].course_deg == 12.5


def test_receiver_that_sends_only_gga_has_no_date_until_rmc_zda_or_a_trusted_clock():
    gga_only = s(GGA) + s(GGA2)
    fixes, decoder = decode(gga_only)
    assert fixes == [] and decoder.counters["no_date"] == 2
    decoder = NmeaDecoder()
    decoder.set_reference_utc(dt.datetime(2017, 1, 9, 23, 59, 50, tzinfo=dt.timezone.utc).timestamp())
    fixes = decoder.feed(gga_only) + decoder.flush()
    # The reference is just before midnight; 00:09:41 is nearest on the next day.
    assert [iso_utc(u) for u, _ in fixes] == ["2017-01-10T00:09:41.000Z", "2017-01-10T00:09:42.000Z"]
    # A ZDA once dates the GGA epochs after it.
    fixes, _ = decode(s("GPZDA,000940.00,10,01,2017,00,00") + gga_only)
    assert [iso_utc(u) for u, _ in fixes] == ["2017-01-10T00:09:41.000Z", "2017-01-10T00:09:42.000Z"]


def test_a_gga_only_capture_dated_once_keeps_its_date_across_midnight():
    data = s("GPGGA,235959.00,4404.1,N,12118.8,W,1,8,1,100,M,,M,,") + s("GPGGA,000000.00,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")
    decoder = NmeaDecoder()
    decoder.set_reference_utc(dt.datetime(2017, 1, 9, 12, tzinfo=dt.timezone.utc).timestamp())
    fixes = decoder.feed(data) + decoder.flush()
    assert [iso_utc(u) for u, _ in fixes] == ["2017-01-09T23:59:59.000Z", "2017-01-10T00:00:00.000Z"]


def test_decode_nmea_date_option_dates_a_gga_only_capture(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "gga.nmea"
    path.write_bytes(s(GGA) + s(GGA2))
    exe = str(Path(sys.executable).with_name("telematics-agent"))
    plain = subprocess.run([exe, "decode-nmea", str(path), "--stats"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout == "" and "no_date=2" in plain.stderr
    dated = subprocess.run([exe, "decode-nmea", str(path), "--date", "2017-01-10"], capture_output=True, text=True, timeout=60)
    assert [line[9:33] for line in dated.stdout.splitlines()] == ["2017-01-10T00:09:41.000Z", "2017-01-10T00:09:42.000Z"]
    missing = subprocess.run([exe, "decode-nmea", str(tmp_path / "nope.nmea")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_midnight_moves_the_date_of_gga_epochs():
    data = s("GPRMC,235959.50,A,4404.1,N,12118.8,W,0,,311216,,,A") + s("GPGGA,235959.50,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")
    data += s("GPGGA,000000.50,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")  # before the next RMC
    fixes, _ = decode(data)
    assert [iso_utc(u) for u, _ in fixes] == ["2016-12-31T23:59:59.500Z", "2017-01-01T00:00:00.500Z"]


def test_the_last_epoch_before_midnight_keeps_its_day_when_only_gga_dates_follow_a_zda():
    data = s("GPZDA,235958.00,31,12,2016,00,00") + s("GPGGA,235959.00,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")
    data += s("GPGGA,000000.00,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")
    fixes, _ = decode(data)
    assert [iso_utc(u) for u, _ in fixes] == ["2016-12-31T23:59:59.000Z", "2017-01-01T00:00:00.000Z"]


def test_10hz_epochs_keep_their_milliseconds():
    data = b"".join(
        s(f"GPRMC,1200{t // 10:02d}.{t % 10}0,A,4404.1,N,12118.8,W,10.0,90.0,100117,,,A")
        + s(f"GPGGA,1200{t // 10:02d}.{t % 10}0,4404.1,N,12118.8,W,1,8,1,100,M,,M,,")
        for t in range(25)
    )
    fixes, _ = decode(data)
    assert len(fixes) == 25
    assert iso_utc(fixes[13][0]) == "2017-01-10T12:00:01.300Z"
    assert all(round((b[0] - a[0]) * 1000) == 100 for a, b in zip(fixes, fixes[1:]))


def test_a_frozen_receiver_repeating_its_time_gives_separate_epochs():
    fixes, _ = decode(s(RMC) + s(GGA) + s(RMC) + s(GGA) + s(RMC) + s(GGA))
    assert len(fixes) == 3 and len({u for u, _ in fixes}) == 1  # the filter rejects the repeats


def test_gps_week_rollover_moves_old_dates_forward_by_1024_weeks():
    floor = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    old = s("GPRMC,120000.00,A,4404.1,N,12118.8,W,0,,100306,,,A")  # 2006-03-10: 1024 weeks before 2025-10-24
    (utc, _), = decode(old, rollover_floor_utc=floor)[0]
    assert iso_utc(utc) == "2025-10-24T12:00:00.000Z"
    (raw, _), = decode(old)[0]  # offline: the capture's own date
    assert utc - raw == GPS_ROLLOVER_S


def test_invalid_fixes_are_decoded_and_flagged_not_dropped():
    # A valid epoch dates the stream; the receiver then loses its fix.
    data = s(RMC) + s("GPRMC,000416.984,V,4131.7353,N,09336.8150,W,0.00,,050405,,") + s(
        "GPGGA,000416.984,4131.7353,N,09336.8150,W,0,00,50.0,280.2,M,-31.6,M,0.0,0000"
    )
    fixes, _ = decode(data)
    assert len(fixes) == 2 and invalid_reason(fixes[1][1]) == "invalid_status"
    assert invalid_reason(Fix(lat=0, lon=0, quality=0)) == "invalid_quality"
    assert invalid_reason(Fix(lat=0, lon=0, mode=1)) == "invalid_mode"
    assert invalid_reason(Fix(lat=0, lon=0, faa_mode="N")) == "invalid_faa"
    assert invalid_reason(Fix(lat=0, lon=0, quality=1, mode=3, status="A", faa_mode="A")) is None


@pytest.mark.parametrize("position", ["9100.0000,N,00000.0000,E", "4404.1,N,18100.0,W", "4460.5,N,12118.8,W", ",,,", "44x4.1,N,12118.8,W"])
def test_impossible_positions_give_no_fix(position):
    fixes, decoder = decode(s(f"GPGGA,000941.00,{position},1,8,1,100,M,,M,,") + s(RMC[:17] + "V" + RMC[18:]))
    assert all(f.status == "V" for _, f in fixes)
    assert all(abs(f.lat) <= 90 and abs(f.lon) <= 180 for _, f in fixes)


def test_decode_file_skips_comments_and_reads_a_last_line_without_ending(tmp_path):
    path = tmp_path / "capture.nmea"
    path.write_bytes(b"# Name: test\n# Date: 2017-01-10\n" + s(RMC) + s(GGA) + s(RMC2, end=""))
    assert [iso_utc(u) for u, _ in decode_file(path)] == ["2017-01-10T00:09:41.000Z", "2017-01-10T00:09:42.000Z"]
    with pytest.raises(OSError):
        list(decode_file(tmp_path / "missing.nmea"))


@pytest.mark.parametrize("day_month", ["99999999999999999999,01", "10,99999999999999999999"])
def test_a_zda_day_or_month_beyond_a_c_long_dates_nothing_and_does_not_raise(day_month):
    # datetime.date raises OverflowError, not ValueError, for these: it used to end the GPS thread.
    fixes, decoder = decode(s(f"GPZDA,000941.00,{day_month},2017,00,00") + s(RMC))
    assert [iso_utc(u) for u, _ in fixes] == ["2017-01-10T00:09:41.000Z"]  # the RMC's date
    assert decoder.counters["sentences"] == 2
