"""Synthetic labeled dialogs for the demo: scam calls and chats versus ordinary conversations.

Rows take the seed's form, `{"input": "发言人1: ...\\n发言人2: ...", "label": true/false,
"instruction": DEFAULT_INSTRUCTION}`, in Chinese and English. Each dialog is drawn from a
scenario script whose steps have several wordings, with its own names, amounts, apps, speaker
labels and fillers, so two dialogs of one scenario rarely match. Everything follows from a seed.

This is demo material, not a fraud corpus: the scripts are written to be learnable by a tiny
model in seconds, and say nothing about real-world fraud detection.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from qrun.workers.datasets import DEFAULT_INSTRUCTION

Step = tuple[int, tuple[str, ...]]  # (speaker index, alternative wordings)


@dataclass(frozen=True)
class Scenario:
    name: str
    lang: str  # "zh" or "en"
    fraud: bool
    roles: tuple[tuple[str, ...], ...]  # per speaker: role labels it may carry ("客服", "Officer")
    steps: tuple[Step, ...]


def _s(name, lang, fraud, roles, *steps) -> Scenario:
    return Scenario(name, lang, fraud, tuple(tuple(r) for r in roles),
                    tuple((who, tuple(lines)) for who, lines in steps))


# ---------------------------------------------------------------- scam scripts (Chinese)

ZH_FRAUD = [
    _s("fake_police", "zh", True, [("民警", "警官", "检察官"), ()],
       (0, ["您好，我是{city}市公安局的{officer}，您名下的银行卡涉嫌一起洗钱案件，需要您配合调查。",
            "这里是{city}公安局刑侦支队，有人用您的身份证办了银行卡，涉嫌非法集资，您现在是嫌疑人。",
            "{victim}，我是{city}检察院的工作人员，您涉嫌一起跨境洗钱案，通缉令已经下来了。"]),
       (1, ["啊？我从来没有办过什么卡啊，是不是搞错了？", "不可能吧，我一直在{home}上班，怎么会涉案呢？",
            "你们真的是警察吗？我怎么核实？"]),
       (0, ["这个案子属于机密，您不能告诉任何人，包括您的家人，否则就是妨碍司法。",
            "为了证明您的清白，需要把您卡里的资金转到我们的安全账户进行审查，审查完会原路退回。",
            "您现在下载{meeting_app}，打开屏幕共享，我们的资金核查员会远程指导您操作。"]),
       (1, ["那我要转多少钱？", "我卡里只有{amount}，都要转吗？", "我能不能先去派出所当面说清楚？"]),
       (0, ["全部转到安全账户，一共{amount}，今天下午{time}之前必须完成，不然就冻结您所有账户。",
            "不用去派出所，案件是远程办理的，您把验证码报给我，我们帮您做资金清查。",
            "请您到没人的房间，不要接其他电话，按我说的把{amount}转到这个账户：{account}。"]),
       (1, ["好的，我现在就去银行。", "那我把验证码告诉你，是{code}。", "我有点害怕，我先问问我儿子。"]),
       (0, ["千万不要告诉您儿子，他也可能被调查，这是为了保护您。",
            "转完以后把回执拍照发给我，我们会给您出具清查证明。"])),
    _s("bank", "zh", True, [("客服", "银行客服", "风控专员"), ()],
       (0, ["您好，我是{bank}信用卡中心的，系统检测到您的账户在{city}有一笔{amount}的异常消费。",
            "{victim}您好，这里是{bank}风控部门，您的银行卡存在被盗刷风险，需要马上处理。",
            "您好，您在{bank}的信用卡可以免费提额到{big_amount}，今天是最后一天办理。"]),
       (1, ["我没有在{city}消费过啊。", "那怎么办，我的钱会不会没了？", "提额需要什么手续？"]),
       (0, ["我们马上给您发一个验证码，您念给我听，我帮您把这笔交易拦截下来。",
            "您点一下短信里的链接，登录后输入卡号和密码，系统会自动解除风险。",
            "需要先把卡里的钱转到我们的临时保管账户，等风险解除再转回来。"]),
       (1, ["验证码是{code}，这样就可以了吗？", "链接打不开，你再发一次。", "要转多少？"]),
       (0, ["还差一步，刚才又触发了保护，请把第二个验证码也告诉我。",
            "请转{amount}到保管账户，不要挂电话，也不要告诉别人，否则拦截会失败。",
            "您这边操作要快，超过{minutes}分钟账户就会被永久冻结。"])),
    _s("customs_parcel", "zh", True, [("快递客服", "海关工作人员", "客服"), ()],
       (0, ["您好，您有一个从{country}寄来的国际包裹被{city}海关扣留了，里面查出{contraband}。",
            "{victim}您好，我是{courier}的客服，您的包裹涉嫌走私，海关要求您缴纳清关费。",
            "您好，您的快递在转运时被海关查扣，需要先交{amount}的保证金才能放行。"]),
       (1, ["我最近没有买国外的东西啊。", "包裹里是什么？我不知道啊。", "清关费要多少？"]),
       (0, ["这件事已经移交给公安了，我帮您转接{city}警方，您配合一下。",
            "您先交{amount}的清关费和罚款，不交的话会影响您的征信，还要承担法律责任。",
            "您加一下我们的工作微信{wechat}，把身份证照片和银行卡号发过来登记。"]),
       (1, ["那我怎么付款？", "我把身份证发给你了。", "要交这么多吗？"]),
       (0, ["扫这个二维码付款，付完截图给我，今天之内必须处理，不然包裹销毁还要追责。",
            "转到这个个人账户就行，是我们海关的代收账户，{account}。"])),
    _s("investment_group", "zh", True, [("导师", "助理", "老师"), (), ("群友",)],
       (0, ["欢迎加入{group}，我们{teacher}老师有内部消息，每天带大家做{asset}，稳赚不赔。",
            "{victim}，上周跟着老师操作的群友都赚了{pct}%，名额有限，今天还能带您一个。",
            "我们平台是{platform}，有内部通道，保证收益，亏了平台全额赔付。"]),
       (2, ["跟着老师做了三天，已经赚了{amount}，太感谢老师了！", "我昨天提现了{amount}，秒到账。"]),
       (1, ["真的这么赚钱吗？", "我没有炒过{asset}，会不会有风险？", "要投多少钱起步？"]),
       (0, ["先下载{platform}的App，充值{amount}试试水，第一单老师亲自带。",
            "起步{amount}，充值越多收益越高，今天充值还送{pct}%的体验金。",
            "现在是最后的上车机会，机会错过就没有了，赶紧把钱转到平台账户。"]),
       (1, ["我充了{amount}，怎么提现不了？", "提现显示要交保证金，这是怎么回事？"]),
       (0, ["您的账户触发了风控，需要再充值{amount}的解冻金才能提现。",
            "提现要先交{pct}%的个人所得税，交完马上到账，这是平台规定。"])),
    _s("prize_tax", "zh", True, [("工作人员", "节目组", "客服"), ()],
       (0, ["恭喜您，您的手机号在{show}的幸运抽奖中被抽中了二等奖，奖品是{prize}和现金{big_amount}。",
            "{victim}您好，您参加的{company}周年庆抽奖中了一等奖，奖金{big_amount}。",
            "您好，您在我们平台的消费满额，获得了{prize}一台，今天需要确认领奖。"]),
       (1, ["真的吗？我怎么不记得参加过抽奖？", "太好了，怎么领奖？", "是不是骗人的？"]),
       (0, ["领奖之前需要先交{pct}%的个人所得税，也就是{amount}，交完立刻给您发奖。",
            "奖品需要先交{amount}的公证费和手续费，这是国家规定，我们不能从奖金里扣。",
            "您把银行卡号和验证码发给我们，我们把奖金打过去，另外要先付{amount}的邮寄费。"]),
       (1, ["税不能从奖金里直接扣吗？", "好吧，我转给你。", "那我转到哪个账户？"]),
       (0, ["不能扣，必须您本人先转，今天{time}之前不交就视为自动放弃，还要承担违约金。",
            "转到我们财务的私人账户{account}，转好后截图发我。"])),
    _s("refund_service", "zh", True, [("客服", "售后客服", "理赔专员"), ()],
       (0, ["您好，我是{shop}的客服，您买的{item}检测出质量问题，我们要给您退款{amount}。",
            "{victim}您好，您的快递在运输中丢失了，{courier}决定给您三倍理赔。",
            "您好，您开通了{shop}的会员服务，每月扣费{amount}，如果不取消会一直扣。"]),
       (1, ["哦，那怎么退款？", "我没有开通过会员啊，怎么取消？", "丢了？那怎么理赔？"]),
       (0, ["您下载{meeting_app}，开启屏幕共享，我一步一步教您操作退款。",
            "您先打开{pay_app}的备用金，借出{amount}，系统会连同退款一起退回给您。",
            "加一下我的微信{wechat}，我发一个理赔链接，您填上银行卡号和密码。"]),
       (1, ["为什么退款要我先借钱？", "我已经共享屏幕了，下一步呢？", "验证码是{code}。"]),
       (0, ["这是为了验证您的账户流水，借出的钱转到指定账户，十分钟后连本带退款一起返还。",
            "操作失败了，您的信用分不够，需要再转{amount}刷流水，不然会影响征信。"])),
    _s("romance", "zh", True, [(), ()],
       (0, ["宝贝，我在{country}的项目出了点问题，账户被冻结了，你能先借我{amount}吗？",
            "亲爱的，认识你这么久，我真想马上回国见你，可是机票钱被公司扣住了。",
            "老婆，我发现一个{platform}的漏洞，稳赚不赔，我带你一起赚钱，以后我们结婚用。"]),
       (1, ["我们还没见过面呢，你要这么多钱干嘛？", "你怎么总是不开视频？", "那我要怎么做？"]),
       (0, ["我这边信号不好不能视频，你相信我，下个月就回去还你，加倍还。",
            "你先在{platform}注册一个账号，充值{amount}，我告诉你什么时候买。",
            "这件事别告诉你家人，他们不懂，等我们赚了钱再给他们惊喜。"]),
       (1, ["我转了{amount}过去，可是提现不了。", "我已经把积蓄都给你了。"]),
       (0, ["提现要先交一笔保证金，再转{amount}就能全部取出来了，相信我。",
            "最后一次了，再转{amount}，我们就能见面了。"])),
    _s("boss_impersonation", "zh", True, [("领导", "老板", "总经理"), ()],
       (0, ["小{surname}，我是{boss}，换了个新号，你存一下。有个急事需要你马上处理。",
            "我是{boss}，现在在开会不方便接电话，你先给这个合作方账户转{amount}的保证金。"]),
       (1, ["好的{boss}，是什么事？", "这个要走财务审批流程吧？", "您稍等，我确认一下。"]),
       (0, ["不用走流程了，客户那边催得紧，你先转，回来我给你签字。",
            "别打电话确认，我在开会，转完把截图发我微信，这件事先别跟别人说。",
            "对方账户是{account}，今天{time}之前必须到账，不然合作就黄了。"]),
       (1, ["好的，我马上转。", "可是金额这么大，我有点不放心。"]),
       (0, ["你还信不过我吗？出了事我负责，抓紧时间。"])),
    _s("task_scam", "zh", True, [("派单员", "客服", "接待员"), ()],
       (0, ["您好，我们招聘兼职刷单员，在家用手机就能做，每单佣金{pct}%，日赚{amount}。",
            "{victim}，您的第一单已经返佣了，现在有一个联单任务，完成后佣金翻倍。"]),
       (1, ["刷单需要垫钱吗？", "上一单的本金怎么还没退给我？", "怎么做？"]),
       (0, ["先垫付{amount}购买商品，完成后本金加佣金一起返还，很多宝妈都在做。",
            "联单必须连续做完三单才能返款，中途停下本金就退不了了，您再转{amount}。",
            "您的操作超时了，账户被冻结，需要交{amount}解冻费才能提现。"]),
       (1, ["我已经转了好几次了，钱还是退不回来。", "那我再转最后一次。"]),
       (0, ["这是最后一步了，导师已经帮您垫了一部分，您补上{amount}就能全部提现。"])),
]

# ---------------------------------------------------------------- scam scripts (English)

EN_FRAUD = [
    _s("fake_police", "en", True, [("Officer", "Agent", "Detective"), ()],
       (0, ["This is {officer} from the {city} police department. Your bank account is linked to a money "
            "laundering case.",
            "Hello {victim}, I am calling from the federal tax office. There is an arrest warrant in your name.",
            "This is a final notice: your social security number was used in a crime and has been suspended."]),
       (1, ["What? I have never done anything like that.", "Is this some kind of mistake?",
            "How do I know you are really the police?"]),
       (0, ["To clear your name you must move your savings into a safe government account while we investigate.",
            "This case is confidential. Do not tell your family or your bank, or you will be charged too.",
            "Install {meeting_app} and share your screen so our financial officer can guide you."]),
       (1, ["How much do I have to move?", "Can I come to the station in person instead?",
            "I only have {amount} in my account."]),
       (0, ["Transfer all {amount} to account {account} before {time} today, or your accounts will be frozen.",
            "Buy gift cards worth {amount} and read me the numbers on the back. That is the fastest way.",
            "No need to come in. Just read me the code we texted you and stay on the line."]),
       (1, ["Okay, I am going to the bank now.", "The code is {code}.", "I want to call my son first."]),
       (0, ["Do not call anyone. Your phone may be monitored by the criminals."])),
    _s("bank", "en", True, [("Bank Support", "Fraud Team", "Agent"), ()],
       (0, ["Hello, this is the fraud department at {bank}. We detected a charge of {amount} in {city} on your card.",
            "Hi {victim}, {bank} security here. Your online banking was accessed from a new device.",
            "Good news, your {bank} card is eligible for a credit limit increase to {big_amount} today only."]),
       (1, ["I did not make that purchase.", "Oh no, what should I do?", "What do you need from me?"]),
       (0, ["I will send you a one-time passcode. Please read it back to me so I can block the payment.",
            "Click the link in the text we just sent and log in with your card number and PIN.",
            "Move your balance to a temporary holding account until the threat is removed."]),
       (1, ["The code is {code}.", "The link is not loading.", "How much should I move?"]),
       (0, ["Another alert just came up. I need the second code as well, quickly.",
            "Transfer {amount} now and stay on the line. Do not tell anyone, it will break the protection.",
            "You have {minutes} minutes before the account is locked for good."])),
    _s("customs_parcel", "en", True, [("Courier", "Customs Officer", "Support"), ()],
       (0, ["Your parcel from {country} is held at customs. We found {contraband} inside.",
            "Hello {victim}, this is {courier}. Your package cannot be delivered until you pay a release fee.",
            "Customs has seized a package in your name. You must pay a clearance fee of {amount}."]),
       (1, ["I did not order anything from abroad.", "What is in the package?", "How much is the fee?"]),
       (0, ["I am transferring you to the {city} police, please cooperate with them.",
            "Pay {amount} in fees and fines today, or you face legal action and the parcel is destroyed.",
            "Send a photo of your ID and your card number to our agent on WhatsApp to register."]),
       (1, ["How do I pay?", "I sent my ID.", "That is a lot of money."]),
       (0, ["Pay with gift cards or a bank transfer to account {account}, and send me the receipt.",
            "It must be paid within the hour. Do not hang up."])),
    _s("investment_group", "en", True, [("Mentor", "Assistant", "Coach"), (), ("Member",)],
       (0, ["Welcome to {group}. Our mentor {teacher} shares insider signals on {asset}, guaranteed profit.",
            "Hi {victim}, members who followed the signals last week made {pct}% returns. One seat is left.",
            "Our platform {platform} has a private channel. Returns are guaranteed, losses fully covered."]),
       (2, ["Followed the mentor for three days and made {amount}, thank you!",
            "I withdrew {amount} yesterday, it arrived instantly."]),
       (1, ["Is it really that profitable?", "I have never traded {asset}. Is it risky?",
            "What is the minimum deposit?"]),
       (0, ["Download the {platform} app and deposit {amount} to start. The first trade is on us.",
            "The minimum is {amount}. The more you deposit, the higher the return, plus a {pct}% bonus today.",
            "This is the last chance to get in. Transfer the money to the platform now."]),
       (1, ["I deposited {amount} but I cannot withdraw.", "It says I need to pay a deposit to withdraw."]),
       (0, ["Your account hit a risk check. Deposit another {amount} to unfreeze your funds.",
            "Withdrawals require a {pct}% tax paid up front. It is the platform rule."])),
    _s("prize_tax", "en", True, [("Prize Team", "Claims Office", "Agent"), ()],
       (0, ["Congratulations! Your number was drawn in the {show} lottery. You won {prize} and {big_amount}.",
            "Hello {victim}, you are the grand prize winner of the {company} anniversary draw: {big_amount}.",
            "You have been selected to receive a free {prize}. We just need to confirm your delivery."]),
       (1, ["Really? I do not remember entering.", "Great, how do I claim it?", "Is this a scam?"]),
       (0, ["Before we release the prize you need to pay the tax of {amount} up front.",
            "There is a processing and shipping fee of {amount}. It cannot be taken from the prize.",
            "Send your bank details and the verification code so we can deposit the money."]),
       (1, ["Can you not take the tax from the winnings?", "Okay, where do I send it?"]),
       (0, ["No, it must be paid by you before {time} today or the prize goes to the next winner.",
            "Pay with gift cards and read me the codes. Our finance team processes them fastest."])),
    _s("refund_service", "en", True, [("Support", "Refund Desk", "Customer Service"), ()],
       (0, ["Hi, this is {shop} customer service. The {item} you bought was recalled and we owe you {amount}.",
            "Hello {victim}, your subscription to {shop} will renew for {amount} unless you cancel it now.",
            "Your delivery was lost by {courier}. You are entitled to a refund of three times the price."]),
       (1, ["Oh, how do I get the refund?", "I never signed up for that. How do I cancel?",
            "What do I need to do?"]),
       (0, ["Install {meeting_app} and share your screen. I will walk you through the refund.",
            "Log in to your online banking so I can process it. Type the amount I tell you.",
            "Oops, I refunded {big_amount} by mistake. Please send back the difference by gift card."]),
       (1, ["I shared my screen. What now?", "Why do I have to send you money?", "The code is {code}."]),
       (0, ["If you do not return the extra money right now I will lose my job. Please hurry.",
            "The refund failed. Transfer {amount} to verify your account and it will come back with it."])),
    _s("romance", "en", True, [(), ()],
       (0, ["Darling, my account overseas is frozen. Could you lend me {amount} until next week?",
            "My love, I want to fly to see you but the agency is holding my ticket money.",
            "Honey, I found a way to make money on {platform}. Let me help you invest for our future."]),
       (1, ["We have never met. Why do you need so much?", "Why can we never video call?",
            "What do I have to do?"]),
       (0, ["The connection here is bad. Trust me, I will pay you back double next month.",
            "Open an account on {platform} and deposit {amount}. I will tell you when to buy.",
            "Do not tell your family, they would not understand. It will be our surprise."]),
       (1, ["I sent {amount} but I cannot withdraw it.", "I have given you all my savings."]),
       (0, ["You need to pay a release fee first. Send {amount} more and everything comes out.",
            "Just one last transfer of {amount} and we can finally be together."])),
    _s("boss_impersonation", "en", True, [("CEO", "Director", "Manager"), ()],
       (0, ["Hi, it is {boss}. This is my new number. I need you to handle something urgent.",
            "I am in a meeting and cannot talk. Please wire {amount} to our new supplier right away."]),
       (1, ["Sure, what is it?", "Should this not go through finance approval?", "Let me confirm first."]),
       (0, ["Skip the approval, the client is pressing. I will sign it off when I am back.",
            "Do not call to confirm, I am in the meeting. Keep this between us and send me the receipt.",
            "The account is {account}. It must arrive before {time} or we lose the deal."]),
       (1, ["Okay, sending it now.", "It is a large amount, I am not comfortable."]),
       (0, ["You do not trust me? I take full responsibility. Just hurry."])),
    _s("task_scam", "en", True, [("Recruiter", "Task Manager", "Coordinator"), ()],
       (0, ["Hi, we are hiring remote part-time workers to rate products. Earn {amount} a day from your phone.",
            "Hello {victim}, your first task paid out. Now you unlocked a combo task with double commission."]),
       (1, ["Do I need to pay anything?", "Why has my deposit not come back?", "How does it work?"]),
       (0, ["Prepay {amount} for the order. Your money and commission are returned when you finish.",
            "Combo tasks must be completed in a row. Stop now and your deposit is lost. Add {amount}.",
            "Your account timed out and is frozen. Pay {amount} to unlock the withdrawal."]),
       (1, ["I have paid several times already and got nothing back.", "Fine, this is the last time."]),
       (0, ["This is the final step. Top up {amount} and you can withdraw everything."])),
]

# ---------------------------------------------------------------- ordinary conversations

ZH_ORDINARY = [
    _s("work_meeting", "zh", False, [("经理", "主管"), ("同事",), ()],
       (0, ["大家好，今天主要同步一下{project}的进度，{weekday}要给客户演示。",
            "我们先看一下上周的数据，{project}这边转化率大概是{pct}%。",
            "明天上午{time}开会，记得带上季度报表。"]),
       (1, ["前端这边基本完成了，还剩下登录页的几个问题。", "测试环境我昨天部署好了，大家可以先看看。",
            "预算这块我跟财务核对过了，还有{amount}的余量。"]),
       (2, ["那我这周把接口文档补齐，{weekday}之前发给大家。", "我这边人手有点紧，能不能晚两天？"]),
       (0, ["可以，那我们就定在{weekday}，有问题随时在群里说。", "好，今天先到这里，会议纪要我会发邮件。",
            "辛苦大家了，下次会议我们看一下上线计划。"])),
    _s("family", "zh", False, [("妈妈", "爸爸", "奶奶"), ("女儿", "儿子"), ()],
       (0, ["晚上回来吃饭吗？我做了{dish}，还买了你爱吃的{fruit}。", "周末你姐姐他们要回来，你有空吗？",
            "天气预报说明天降温，你记得多穿点衣服。"]),
       (1, ["回来的，大概{time}到家。", "这周要加班，下周再回去看你们。", "知道啦，你们也注意身体。"]),
       (0, ["好，那我等你。路上慢点。", "你爸最近血压有点高，我带他去医院看了，医生说问题不大。",
            "你表妹下个月结婚，到时候我们一起去{city}。"]),
       (1, ["那太好了，我提前请假。", "要不要我给你们订车票？", "我给爸买了个血压计，明天寄到。"])),
    _s("shopping", "zh", False, [("店员", "老板"), ("顾客",)],
       (0, ["您好，这款{item}今天有活动，打{discount}折，原价{amount}。", "欢迎光临，随便看看，有需要叫我。",
            "这个颜色卖得最好，还剩最后两件。"]),
       (1, ["有没有大一号的？", "能不能再便宜一点？", "可以刷卡吗？"]),
       (0, ["有的，我去仓库帮您拿。", "已经是最低价了，不过可以送您一个小礼品。", "可以，刷卡扫码都行，发票开在小票上。"]),
       (1, ["那就要这个吧，不合适可以退吗？", "好，我先试一下。"]),
       (0, ["七天内带着小票来门店就可以退换。", "好的，试衣间在那边。"])),
    _s("travel", "zh", False, [(), ()],
       (0, ["我们{weekday}去{city}的高铁票买好了吗？", "酒店我订在西湖边上，走路十分钟就到。",
            "这次去{city}打算玩几天？"]),
       (1, ["买好了，上午{time}的车，二等座。", "三天吧，第一天去博物馆，第二天爬山。", "我想去吃当地的小吃。"]),
       (0, ["那我们提前半小时到车站，带好身份证。", "听说那边周末人很多，要早点出门。",
            "行李不用带太多，那边天气挺暖和的。"]),
       (1, ["好的，我把行程表发到群里了。", "我负责订餐厅，你负责拍照。"])),
    _s("earnings_call", "zh", False, [("发言人",), ("发言人",), ("发言人",)],
       (0, ["我们今年上半年营收同比增长了{pct}%，主要是{segment}业务的贡献。",
            "那我们看一下上半年三四月份的数据，债务情况有没有一些缓解，还要继续观察。",
            "大家好，通过网络端接入的投资者可点击举手连麦等候提问，或在文字交流区提交您的问题。"]),
       (1, ["想请问一下管理层，毛利率下降的原因是什么？", "下半年的资本开支大概是多少？",
            "{segment}这块的竞争格局怎么样？"]),
       (0, ["毛利率主要是受原材料价格影响，我们预计下半年会有所改善。",
            "资本开支我们控制在{big_amount}左右，主要投在新产线上。",
            "这个我们在年报里有披露，整体来说份额是稳中有升的。"]),
       (2, ["理解理解，谢谢。", "明白，那我再追问一个关于海外市场的问题。", "好的，感谢回答。"])),
    _s("doctor", "zh", False, [("医生",), ("病人", "患者")],
       (0, ["您哪里不舒服？", "检查结果出来了，问题不大，注意休息。", "这个药一天三次，饭后服用，一周后来复查。"]),
       (1, ["最近老是头疼，晚上睡不好。", "需要做什么检查吗？", "医保可以报销吗？"]),
       (0, ["先量个血压，再去验个血。", "可以报销，您在一楼窗口缴费就行。", "少熬夜，多喝水，有情况随时来。"])),
    _s("school", "zh", False, [("老师", "班主任"), ("家长",)],
       (0, ["{victim}家长您好，孩子最近数学进步很大。", "下周一期中考试，范围是第一到第五章。",
            "周五下午开家长会，请您准时参加。"]),
       (1, ["谢谢老师，他在家也挺用功的。", "好的，我们会督促他复习。", "我那天要上班，可以请他爸爸去吗？"]),
       (0, ["可以的，到时候在教学楼三楼。", "他语文阅读还要加强，可以多看看课外书。"])),
    # Hard negatives: ordinary talk that uses the scams' words (验证码, 转账, 安全账户, 投资, 退款).
    _s("scam_warning", "zh", False, [("社区民警", "民警", "网格员"), ("居民", "大爷", "阿姨")],
       (0, ["大家注意，最近有人冒充公检法打电话，说您涉嫌洗钱，让您把钱转到安全账户，这都是诈骗。",
            "{victim}，我们来社区做反诈宣传，公安机关从来不会在电话里办案，也没有什么安全账户。",
            "提醒您一下，银行和客服都不会向您索要验证码，谁要验证码谁就是骗子。"]),
       (1, ["上次我就接到一个电话，说我快递丢了要理赔，我直接挂了。", "那要是对方知道我的名字和身份证号呢？",
            "我儿子给我装了国家反诈中心App。"]),
       (0, ["挂得对，遇到让您转账、共享屏幕、下载会议软件的，一律不理，直接打110核实。",
            "知道您信息也不要信，个人信息可能泄露了，但只要不转账就不会有损失。",
            "这个App很好，来电有风险会提醒您，您家里老人也可以装一个。"]),
       (1, ["好的，记住了，不转账，不说验证码。", "谢谢你们，我回去跟老伴也说一说。"])),
    _s("fund_chat", "zh", False, [(), ()],
       (0, ["我最近在{pay_app}上买了点基金，做定投，每个月{amount}。", "你那个理财产品收益怎么样？",
            "{bank}的理财经理推荐了一款产品，年化大概{small_pct}%。"]),
       (1, ["定投挺好的，不过基金有风险，别投太多。", "收益一般，今年还亏了一点。", "那个是保本的吗？要看清楚合同。"]),
       (0, ["对，我就拿闲钱投，亏了也不影响生活。", "不保本，不过风险等级是R2，还算稳健。",
            "我打算去网点当面问问，不在网上乱点链接。"]),
       (1, ["那些说稳赚不赔、带你炒股的群千万别进。", "嗯，投资还是要靠自己，别听别人忽悠。"])),
    _s("real_refund", "zh", False, [("客服", "售后"), ("顾客",)],
       (0, ["您好，这里是{shop}官方客服，您在App里申请的{item}退货已经审核通过了。",
            "您好，您的订单已经退款{amount}，原路退回到您的{pay_app}，一到三个工作日到账。"]),
       (1, ["好的，需要我提供银行卡号吗？", "要不要我把验证码发给你？", "快递员什么时候来取件？"]),
       (0, ["不需要，退款会原路返回，我们不会向您索要验证码，也不会让您转账。",
            "快递员明天上午上门取件，您把商品和配件放好就行。", "您在订单页面就能看到退款进度。"]),
       (1, ["好的，谢谢。", "明白了，我在App里看到了。"])),
    _s("bank_visit", "zh", False, [("柜员", "大堂经理"), ("客户",)],
       (0, ["您好，请问办理什么业务？", "您的新卡已经办好了，请在这里签字。",
            "提醒您一下，银行不会打电话要验证码，遇到这种情况直接挂掉。"]),
       (1, ["我想办一张借记卡。", "我的卡丢了，想挂失补办。", "定期存款现在利率是多少？"]),
       (0, ["请出示一下身份证，填一下这张表。", "挂失已经办好了，新卡七个工作日后来取。",
            "三年期大概是{small_pct}%，具体以柜台公告为准。"]),
       (1, ["好的，谢谢。", "那我存{amount}三年期。"])),
]

EN_ORDINARY = [
    _s("work_meeting", "en", False, [("Manager", "Lead"), ("Engineer",), ()],
       (0, ["Let's go through the status of {project}. The client demo is on {weekday}.",
            "Quick look at last week's numbers: conversion on {project} was about {pct}%.",
            "Tomorrow's meeting is at {time}, please bring the quarterly report."]),
       (1, ["The frontend is mostly done, a few issues left on the login page.",
            "I deployed the staging build yesterday, take a look when you can.",
            "I checked the budget with finance, we still have {amount} left."]),
       (2, ["I will finish the API docs and share them before {weekday}.",
            "We are a bit short on people this week, can we push it by two days?"]),
       (0, ["Fine, let's say {weekday}. Ping the channel if anything comes up.",
            "Okay, that's all for today. I will send the notes by email.",
            "Thanks everyone, next time we go over the release plan."])),
    _s("family", "en", False, [("Mom", "Dad", "Grandma"), ()],
       (0, ["Are you coming home for dinner? I made {dish_en}.", "Your sister is visiting this weekend, are you free?",
            "It is supposed to get cold tomorrow, take a jacket."]),
       (1, ["Yes, I will be home around {time}.", "I have to work late this week, maybe next weekend.",
            "Thanks, you take care too."]),
       (0, ["Great, drive safely.", "Your dad saw the doctor about his blood pressure, it is nothing serious.",
            "Your cousin is getting married next month in {city}."]),
       (1, ["That is wonderful, I will take a day off.", "Should I book the train tickets for you?"])),
    _s("shopping", "en", False, [("Clerk", "Cashier"), ("Customer",)],
       (0, ["Hi, this {item} is {discount} percent off today, normally {amount}.", "Welcome in, let me know if you need help.",
            "This color is our best seller, we only have two left."]),
       (1, ["Do you have it one size up?", "Can you do a better price?", "Do you take cards?"]),
       (0, ["Sure, let me check the back.", "That is the lowest price, but I can add a free gift.",
            "Yes, card or phone, the receipt has the invoice."]),
       (1, ["I will take it. Can I return it if it does not fit?", "Okay, let me try it on."]),
       (0, ["Returns within seven days with the receipt, at any store.", "The fitting room is over there."])),
    _s("travel", "en", False, [(), ()],
       (0, ["Did you book the train to {city} for {weekday}?", "I booked the hotel near the river, ten minutes on foot.",
            "How many days are we staying in {city}?"]),
       (1, ["Yes, the {time} train, second class.", "Three days: museum first, hiking the next day.",
            "I want to try the street food."]),
       (0, ["Let's get to the station half an hour early and bring our passports.",
            "It gets crowded on weekends, we should leave early.", "Pack light, it is warm there."]),
       (1, ["I shared the itinerary in the group chat.", "I will book the restaurants, you take the photos."])),
    _s("earnings_call", "en", False, [("Speaker",), ("Speaker",), ("Speaker",)],
       (0, ["Revenue for the first half grew {pct}% year over year, driven by our {segment_en} business.",
            "Operator: we will now open the line for questions from analysts.",
            "Gross margin came in lower this quarter because of input costs."]),
       (1, ["Could management comment on the margin outlook for the second half?",
            "What is the capital expenditure plan for next year?", "How is competition in {segment_en}?"]),
       (0, ["We expect margins to improve as raw material prices ease.",
            "Capex will be around {big_amount}, mostly for the new production line.",
            "We disclose that in the annual report; overall our share is stable to rising."]),
       (2, ["Understood, thank you.", "Got it, a follow-up on overseas markets.", "Thanks for the color."])),
    _s("doctor", "en", False, [("Doctor",), ("Patient",)],
       (0, ["What seems to be the problem?", "Your results look fine, just get some rest.",
            "Take this three times a day after meals and come back in a week."]),
       (1, ["I keep getting headaches and I cannot sleep.", "Do I need any tests?", "Does my insurance cover it?"]),
       (0, ["Let's check your blood pressure and do a blood test.", "Yes, you can pay at the front desk.",
            "Less screen time at night, and drink more water."])),
    _s("school", "en", False, [("Teacher",), ("Parent",)],
       (0, ["Hi, {victim}'s math has improved a lot this term.", "The midterm is next Monday, chapters one to five.",
            "Parent-teacher meeting is on Friday afternoon."]),
       (1, ["Thank you, he has been working hard at home.", "We will make sure he revises.",
            "I work that day, can his father come instead?"]),
       (0, ["Of course, it is on the third floor.", "His reading could use more practice, try library books."])),
    # Hard negatives: ordinary talk that uses the scams' words (codes, transfers, refunds, investing).
    _s("scam_warning", "en", False, [("Officer", "Volunteer"), ("Resident", "Neighbor")],
       (0, ["We are here about phone scams. Callers pretend to be police and ask you to move money to a safe "
            "account. That is always a scam.",
            "Hi {victim}, just a reminder: your bank will never ask you for a code or ask you to transfer money.",
            "If anyone asks you to share your screen or pay in gift cards, hang up."]),
       (1, ["Someone called me about a lost parcel last week, I hung up.", "What if they know my name and address?",
            "My son set up call blocking on my phone."]),
       (0, ["Good call. Never transfer money on a call, call your bank on the number on your card.",
            "They may have leaked data, but you lose nothing as long as you do not pay.",
            "That is great, maybe set it up for your parents too."]),
       (1, ["Got it: no transfers, no codes.", "Thanks, I will tell my neighbors."])),
    _s("fund_chat", "en", False, [(), ()],
       (0, ["I started putting {amount} a month into an index fund.", "How is your retirement account doing?",
            "My bank advisor suggested a bond fund, about {small_pct}% a year."]),
       (1, ["Nice, just remember funds can go down too.", "Not great this year, down a little.",
            "Is it guaranteed? Read the terms."]),
       (0, ["Yes, only money I will not need for years.", "Not guaranteed, but it is low risk.",
            "I will ask at the branch in person rather than clicking links."]),
       (1, ["Stay away from those groups promising guaranteed profits.", "Agreed, nobody gets rich quick."])),
    _s("real_refund", "en", False, [("Support", "Agent"), ("Customer",)],
       (0, ["Hi, this is {shop} support replying to your chat. Your return for the {item} is approved.",
            "Your refund of {amount} was issued to your original payment method, allow three to five days."]),
       (1, ["Do you need my card number?", "Should I send you the code I got?", "When will the courier come?"]),
       (0, ["No, the refund goes back automatically. We will never ask for a code or a transfer.",
            "The courier comes tomorrow morning, just have the box ready.", "You can track it on the order page."]),
       (1, ["Great, thanks.", "I see it in the app now."])),
    _s("bank_visit", "en", False, [("Teller",), ("Customer",)],
       (0, ["Good morning, how can I help you?", "Your new card is ready, please sign here.",
            "Just a reminder: the bank will never call you to ask for a code."]),
       (1, ["I would like to open a checking account.", "I lost my card and want to report it.",
            "What is the rate on a three-year deposit?"]),
       (0, ["May I see your ID? Please fill in this form.", "The card is blocked, the new one arrives in a week.",
            "About {small_pct}% at the moment, the branch notice has the exact rate."]),
       (1, ["Thanks.", "I will put {amount} in the three-year deposit then."])),
]

SCENARIOS = ZH_FRAUD + EN_FRAUD + ZH_ORDINARY + EN_ORDINARY

# ---------------------------------------------------------------- slot values

ZH_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢钟姜崔谭陆范汪廖石金韦贾夏付方邹熊白孟秦邱侯江尹薛闫段雷龙黎史陶贺毛郝顾龚邵万覃武钱戴严莫孔向常汤康易乔赖文"
ZH_GIVEN = ["伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "涛", "明", "超", "秀英",
            "霞", "平", "刚", "桂英", "志远", "建华", "晓燕", "海涛", "婷婷", "子涵", "浩然", "雨桐", "欣怡", "俊杰",
            "梓轩", "思远", "文博", "佳怡", "清", "涵", "红", "宇", "鑫", "凯", "斌", "琳", "倩", "晨", "昊"]
EN_FIRST = ["James", "Mary", "John", "Linda", "Robert", "Sarah", "Michael", "Emma", "David", "Olivia", "Daniel",
            "Sophia", "Chris", "Grace", "Kevin", "Laura", "Brian", "Nina", "Tom", "Alice", "Peter", "Helen", "Mark",
            "Julia", "Sam", "Ruth", "Omar", "Priya", "Wei", "Carlos", "Fatima", "Ivan", "Mei", "Lucas", "Zoe"]
EN_LAST = ["Smith", "Brown", "Wilson", "Taylor", "Clark", "Lee", "Walker", "Hall", "Young", "King", "Wright",
           "Lopez", "Hill", "Green", "Adams", "Baker", "Nelson", "Carter", "Chen", "Patel", "Khan", "Garcia"]

SLOTS = {
    "zh": {
        "city": ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "苏州", "天津", "长沙"],
        "home": ["公司", "工厂", "学校", "医院", "家里"],
        "bank": ["工商银行", "建设银行", "农业银行", "中国银行", "招商银行", "交通银行", "浦发银行"],
        "meeting_app": ["腾讯会议", "钉钉", "Zoom", "一个会议软件", "安全防护App"],
        "country": ["日本", "美国", "泰国", "马来西亚", "英国", "澳大利亚", "韩国"],
        "contraband": ["违禁药品", "多本护照", "走私香烟", "假冒银行卡"],
        "courier": ["顺丰", "中通", "圆通", "韵达", "京东物流", "EMS"],
        "group": ["财富自由交流群", "牛股VIP群", "价值投资学习群", "数字货币内部群"],
        "teacher": ["王", "李", "陈", "张", "刘"],
        "asset": ["股票", "数字货币", "外汇", "黄金期货", "原始股"],
        "platform": ["鑫盛国际", "汇通财富", "金鼎资本", "环球优选", "CoinMax"],
        "show": ["中国好声音", "奔跑吧", "开心辞典", "幸运大转盘"],
        "prize": ["笔记本电脑", "苹果手机", "小轿车", "金条"],
        "company": ["京东", "淘宝", "拼多多", "苏宁", "国美"],
        "shop": ["淘宝", "京东", "拼多多", "抖音商城", "唯品会"],
        "item": ["羽绒服", "儿童玩具", "面膜", "运动鞋", "电饭煲", "手机壳", "奶粉", "台灯"],
        "pay_app": ["支付宝", "微信", "京东金融"],
        "project": ["会员系统", "新版官网", "数据平台", "小程序", "二期工程"],
        "weekday": ["周一", "周二", "周三", "周四", "周五"],
        "dish": ["红烧肉", "糖醋排骨", "饺子", "鱼汤", "回锅肉"],
        "fruit": ["草莓", "西瓜", "橘子", "葡萄", "芒果"],
        "segment": ["饲料", "新能源", "消费电子", "医药", "物流", "半导体"],
        "discount": ["八", "七", "九", "六"],
    },
    "en": {
        "city": ["Chicago", "Toronto", "Leeds", "Sydney", "Denver", "Austin", "Dublin", "Boston", "Seattle"],
        "bank": ["First National", "Harbor Bank", "Union Trust", "City Savings", "Metro Credit Union"],
        "meeting_app": ["AnyDesk", "TeamViewer", "a remote support app", "Zoom"],
        "country": ["Mexico", "Nigeria", "China", "Turkey", "Brazil", "India"],
        "contraband": ["illegal drugs", "fake passports", "undeclared cash", "counterfeit goods"],
        "courier": ["FedEx", "DHL", "UPS", "the postal service"],
        "group": ["Wealth Circle", "Crypto Insiders", "Smart Money Club", "Daily Signals VIP"],
        "teacher": ["Professor Li", "Mr. Grant", "Dr. Stone", "Coach Mike"],
        "asset": ["crypto", "forex", "gold futures", "penny stocks"],
        "platform": ["CoinMax", "GoldTrust Pro", "AlphaYield", "Nexa Markets"],
        "show": ["national", "holiday", "radio station", "supermarket"],
        "prize": ["a new car", "a laptop", "an iPhone", "a cruise"],
        "company": ["Amazon", "Walmart", "Costco", "Target"],
        "shop": ["Amazon", "eBay", "Best Buy", "Netflix", "the online store"],
        "item": ["jacket", "blender", "phone case", "kids toy", "sneakers", "desk lamp"],
        "project": ["the billing system", "the new website", "the data platform", "the mobile app"],
        "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
        "dish_en": ["lasagna", "chicken soup", "dumplings", "roast beef", "curry"],
        "segment_en": ["logistics", "consumer electronics", "healthcare", "renewables", "semiconductors"],
        "discount": ["20", "30", "40", "50"],
    },
}

FILLERS = {"zh": ["嗯，", "那个，", "就是，", "呃，", "对，", "然后", "怎么说呢，", "喂，"],
           "en": ["Um, ", "Well, ", "So, ", "Uh, ", "Okay, ", "Right, ", "Look, "]}
TAILS = {"zh": ["对吧？", "你明白吗？", "好吧。", "啊。"], "en": [" Okay?", " You know?", " Alright?", " Right?"]}


def _chinese_name(rng: random.Random) -> str:
    return rng.choice(ZH_SURNAMES) + rng.choice(ZH_GIVEN)


def _english_name(rng: random.Random) -> str:
    return f"{rng.choice(EN_FIRST)} {rng.choice(EN_LAST)}"


def _amount(rng: random.Random, lang: str, low: int, high: int) -> str:
    value = rng.randrange(low, high) * rng.choice([1, 10, 100])
    if lang == "zh":
        if value >= 10000 and rng.random() < 0.5:
            return f"{value / 10000:g}万元"
        return f"{value}{rng.choice(['元', '块', '块钱'])}"
    return rng.choice([f"${value:,}", f"{value:,} dollars", f"£{value:,}"])


def _clock(rng: random.Random, lang: str) -> str:
    hour = rng.randrange(8, 18)
    if lang == "zh":
        return f"{hour}点" + rng.choice(["", "半"])
    return f"{hour if hour <= 12 else hour - 12}{rng.choice(['', ':30'])} {'a.m.' if hour < 12 else 'p.m.'}"


def _slot_values(rng: random.Random, lang: str) -> dict[str, str]:
    """One dialog's names, amounts and places, fixed for all its lines."""
    values = {k: rng.choice(v) for k, v in SLOTS[lang].items()}
    person = _chinese_name if lang == "zh" else _english_name
    victim = person(rng)
    values.update(
        victim=victim, officer=person(rng), boss=person(rng), surname=victim[0],
        amount=_amount(rng, lang, 5, 500), big_amount=_amount(rng, lang, 100, 5000),
        pct=str(rng.choice([5, 8, 10, 12, 15, 20, 30, 50])), small_pct=f"{rng.uniform(1.2, 2.8):.2f}",
        code=f"{rng.randrange(10**5, 10**6)}", minutes=str(rng.choice([5, 10, 15, 30])),
        account=f"{rng.randrange(6200, 6299)} {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}",
        wechat=f"{rng.choice(['kf', 'vip', 'lp', 'hg'])}{rng.randrange(1000, 99999)}",
        time=_clock(rng, lang),
    )
    return values


def _speaker_labels(rng: random.Random, scenario: Scenario) -> list[str]:
    """Labels such as 发言人3, 民警 or 黄志远; the seed data mixes all three styles."""
    numbered = "发言人{}" if scenario.lang == "zh" else "Speaker {}"
    if rng.random() < 0.35:
        return [numbered.format(i) for i in rng.sample(range(1, 13), len(scenario.roles))]
    person = _chinese_name if scenario.lang == "zh" else (lambda r: r.choice(EN_FIRST))
    labels: list[str] = []
    for roles in scenario.roles:
        label = rng.choice(roles) if roles and rng.random() < 0.6 else person(rng)
        if label in ("发言人", "Speaker"):
            label = numbered.format(rng.randrange(1, 13))
        while label in labels:
            label = person(rng)
        labels.append(label)
    return labels


def _line(rng: random.Random, lang: str, template: str, values: dict[str, str]) -> str:
    text = template.format(**values)
    if rng.random() < 0.2:
        filler = rng.choice(FILLERS[lang])
        text = filler + (text[0].lower() + text[1:] if lang == "en" and not text.startswith("I ") else text)
    if rng.random() < 0.08 and not text.endswith(("?", "？")):
        text += rng.choice(TAILS[lang])
    return text


def render_dialog(rng: random.Random, scenario: Scenario) -> str:
    """One dialog from `scenario`: a window of its steps (at least two lines), one wording each."""
    values = _slot_values(rng, scenario.lang)
    labels = _speaker_labels(rng, scenario)
    steps = [s for i, s in enumerate(scenario.steps) if i == 0 or rng.random() < 0.85]
    if len(steps) < 2:
        steps = list(scenario.steps[:2])
    start = rng.randrange(0, max(1, len(steps) - 2)) if rng.random() < 0.3 else 0
    end = rng.randrange(min(len(steps), start + 2), len(steps) + 1)
    lines = [f"{labels[who]}: {_line(rng, scenario.lang, rng.choice(options), values)}"
             for who, options in steps[start:end]]
    return "\n".join(lines)


def generate_rows(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n rows, half fraud and half ordinary, each half split evenly between Chinese and English.

    Rows whose input is in `exclude` (or repeats an earlier row) are redrawn, so held-out splits
    never copy training rows.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    pools = {(fraud, lang): [s for s in SCENARIOS if s.fraud == fraud and s.lang == lang]
             for fraud in (True, False) for lang in ("zh", "en")}
    keys = [(i % 2 == 0, "zh" if (i // 2) % 2 == 0 else "en") for i in range(n)]
    rows = []
    for fraud, lang in keys:
        for _ in range(1000):
            text = render_dialog(rng, rng.choice(pools[(fraud, lang)]))
            if text not in seen:
                break
        else:
            raise RuntimeError(f"the {lang} {'fraud' if fraud else 'ordinary'} scripts ran out of distinct dialogs")
        seen.add(text)
        rows.append({"input": text, "label": fraud, "instruction": DEFAULT_INSTRUCTION})
    rng.shuffle(rows)
    return rows


def generate_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Disjoint splits, such as {"train": 1200, "valid": 100, "eval": 200}, drawn in that order."""
    used: set[str] = set()
    splits = {}
    for offset, (name, size) in enumerate(sizes.items()):
        splits[name] = generate_rows(size, seed * 1000 + offset, exclude=used)
        used.update(row["input"] for row in splits[name])
    return splits


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
