// The alarm banner of the console's pages: unacknowledged alarms, each with an acknowledge button.
(function () {
  const banner = document.createElement("div");
  banner.id = "alarm-banner";
  banner.style.cssText = "display:none;background:#b91c1c;color:#fff;padding:6px 12px;font:14px system-ui,sans-serif";
  document.body.prepend(banner);
  async function acknowledge(id) {
    await fetch("/api/alarms/ack?id=" + encodeURIComponent(id), {method: "POST", headers: {"X-Console": "ack"}});
    refresh();
  }
  async function refresh() {
    let data;
    try { data = await (await fetch("/api/alarms")).json(); } catch (e) { return; }
    banner.replaceChildren();
    for (const alarm of data.active) {
      const row = document.createElement("div");
      row.className = "alarm";
      row.dataset.alarmId = alarm.alarm_id;
      const when = new Date(alarm.raised_unix_s * 1000).toLocaleTimeString();
      row.textContent = `ALARM (severity ${alarm.severity}, ${when}): ${alarm.message} `;
      const button = document.createElement("button");
      button.textContent = "acknowledge";
      button.onclick = () => acknowledge(alarm.alarm_id);
      row.append(button);
      banner.append(row);
    }
    banner.style.display = data.active.length ? "block" : "none";
  }
  refresh();
  setInterval(refresh, 2000);
})();
